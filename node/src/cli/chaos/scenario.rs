//! A chaos scenario: the cluster to run and a timeline of events, read from
//! TOML and checked before anything starts. Pure: no processes, no network.
//!
//! ```toml
//! description = "half the nodes die at round 10; three come back at 20"
//!
//! [cluster]                 # murmur cluster's --config keys
//! nodes = 8
//! rounds = 30
//!
//! [[event]]
//! round = 10                # or: secs = 4.5, after the first round ends
//! action = "kill"           # kill | stop | restart | join | fault | clear | partition | heal
//!                           # with netns = true also: link | cut | restore
//! nodes = "random:4"        # [0, 3], "all", "hubs:K", "leaves:K", "random:K"
//!
//! [[event]]
//! round = 20
//! action = "restart"
//! nodes = "killed"          # the nodes an earlier kill or stop took down
//!
//! [expect]
//! survivors_finish = true
//! min_accuracy = 0.8        # the average of the final models, held out
//! max_drop = 0.05           # against --baseline, in accuracy
//! ```
//!
//! A node named by a `join` event is not started with the others: the event
//! starts it, and it joins the run under way (`murmur run --join-running`).
//!
//! With `netns = true` (or `murmur chaos --netns`) every node runs in a
//! network namespace of its own, and three more actions act on its link:
//! `link` sets random ingress `loss = 0.05` and a `rate = "100mbit"` cap
//! (`rate = "off"` lifts it), `cut` sets the link down and `restore` sets
//! it up; a partition there is an nftables drop, not the injector's.
//!
//! With `[attach] apis = ["host:port", ...]` instead of `[cluster]`, the
//! nodes are already running elsewhere and only what their APIs offer is
//! allowed (`ATTACHED_ACTIONS`). `relays = "hubs:2"` at the top makes
//! nodes of a started cluster data-less relays.
//!
//! Selections by degree (`hubs:K`, `leaves:K`) read the topology the nodes
//! build over their first members, which they order by peer id: they are
//! resolved once the nodes' ids are known (`Selection::resolve`), and the
//! check only makes sure K fits.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::fault::{FaultKind, FaultSpec};

/// The scenario as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    #[serde(default)]
    pub description: String,
    /// murmur cluster's options (the keys of its --config TOML).
    #[serde(default)]
    pub cluster: toml::Table,
    /// Nodes already running elsewhere, reached through their APIs only
    /// (instead of a [cluster] started here).
    pub attach: Option<AttachFile>,
    /// One network namespace per node (needs root; see `netns`).
    #[serde(default)]
    pub netns: bool,
    /// Nodes that hold no data and only mix (`murmur run --relays`), chosen
    /// like an event's nodes: a list, "hubs:K", "leaves:K" or "random:K".
    pub relays: Option<toml::Value>,
    #[serde(default, rename = "event")]
    pub events: Vec<EventFile>,
    #[serde(default)]
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFile {
    pub round: Option<i64>,
    pub secs: Option<f64>,
    pub action: String,
    pub nodes: Option<toml::Value>,
    pub fault: Option<String>,
    pub groups: Option<Vec<Vec<i64>>>,
    /// link: the fraction of packets dropped on the nodes' ingress.
    pub loss: Option<f64>,
    /// link: the rate cap on the nodes' links ("100mbit"; "off" lifts it).
    pub rate: Option<String>,
    /// A name for the event's window in the report.
    pub label: Option<String>,
}

/// Running nodes to act on, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AttachFile {
    /// Their gRPC API addresses (host:port), node 0 first.
    pub apis: Vec<String>,
    /// The token their APIs want (a file holding it).
    pub api_token_file: Option<std::path::PathBuf>,
    /// The CA certificate their APIs' TLS is checked against.
    pub api_tls_cert: Option<std::path::PathBuf>,
}

/// What the runner may do to a node it did not start: what its API offers.
pub const ATTACHED_ACTIONS: &str = "fault, clear, partition, heal and stop";

/// What the run must show; `murmur chaos` exits non-zero when it does not.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Every node no event left down exits 0 with all its rounds.
    #[serde(default = "yes")]
    pub survivors_finish: bool,
    /// The held-out accuracy of the average of the final models at least this.
    pub min_accuracy: Option<f64>,
    /// With --baseline: that accuracy at most this far below the baseline's.
    pub max_drop: Option<f64>,
}

fn yes() -> bool {
    true
}

impl Default for Expect {
    fn default() -> Expect {
        Expect { survivors_finish: true, min_accuracy: None, max_drop: None }
    }
}

/// When an event fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    /// When the furthest live node has completed this many rounds.
    Round(u64),
    /// This long after the first node completed its first round.
    After(Duration),
}

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            When::Round(r) => write!(f, "round {r}"),
            When::After(d) => write!(f, "{:.1}s", d.as_secs_f64()),
        }
    }
}

/// Which nodes an event acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    Nodes(BTreeSet<usize>),
    All,
    /// The K nodes of highest degree in the topology (ties: lower position).
    Hubs(usize),
    /// The K nodes of lowest degree.
    Leaves(usize),
    /// K nodes drawn with the run's seed.
    Random(usize),
    /// The nodes down now (by an earlier kill or stop).
    Down,
}

impl Selection {
    /// How many nodes it names, where that is known before the run.
    pub fn count(&self) -> Option<usize> {
        match self {
            Selection::Nodes(s) => Some(s.len()),
            Selection::Hubs(k) | Selection::Leaves(k) | Selection::Random(k) => Some(*k),
            Selection::All | Selection::Down => None,
        }
    }
}

impl fmt::Display for Selection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selection::Nodes(s) => {
                let v: Vec<String> = s.iter().map(ToString::to_string).collect();
                write!(f, "[{}]", v.join(", "))
            }
            Selection::All => f.write_str("all"),
            Selection::Hubs(k) => write!(f, "hubs:{k}"),
            Selection::Leaves(k) => write!(f, "leaves:{k}"),
            Selection::Random(k) => write!(f, "random:{k}"),
            Selection::Down => f.write_str("killed"),
        }
    }
}

/// What an event does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// SIGKILL.
    Kill(Selection),
    /// SIGTERM: the node saves its checkpoint and leaves.
    Stop(Selection),
    /// Start again with --resume (a node that is down).
    Restart(Selection),
    /// Start nodes held back from the start: they join the run under way.
    Join(BTreeSet<usize>),
    /// An injector fault, through the API.
    Fault(Selection, FaultSpec),
    /// Clear the faults earlier events injected on these nodes.
    Clear(Selection),
    /// No traffic between groups (each node partitioned from the others').
    Partition(Vec<BTreeSet<usize>>),
    /// Clear every partition.
    Heal,
    /// netns: reshape the nodes' links.
    Link(Selection, LinkChange),
    /// netns: set the nodes' links down.
    Cut(Selection),
    /// netns: set them up again.
    Restore(Selection),
}

/// What a `link` event changes; what it leaves out stays as it was.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkChange {
    pub loss: Option<f64>,
    /// `Some(None)`: lift the cap.
    pub rate_bits: Option<Option<u64>>,
}

impl fmt::Display for LinkChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(l) = self.loss {
            parts.push(format!("loss {:.1}%", l * 100.0));
        }
        match self.rate_bits {
            Some(Some(b)) => parts.push(format!("rate {}", rate_text(b))),
            Some(None) => parts.push("rate off".into()),
            None => {}
        }
        f.write_str(&parts.join(", "))
    }
}

/// Bits per second as a person writes them.
pub fn rate_text(bits: u64) -> String {
    match bits {
        b if b >= 1_000_000_000 && b % 1_000_000_000 == 0 => format!("{}gbit", b / 1_000_000_000),
        b if b >= 1_000_000 && b % 1_000_000 == 0 => format!("{}mbit", b / 1_000_000),
        b if b % 1000 == 0 => format!("{}kbit", b / 1000),
        b => format!("{b}bit"),
    }
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Kill(_) => "kill",
            Action::Stop(_) => "stop",
            Action::Restart(_) => "restart",
            Action::Join(_) => "join",
            Action::Fault(..) => "fault",
            Action::Clear(_) => "clear",
            Action::Partition(_) => "partition",
            Action::Heal => "heal",
            Action::Link(..) => "link",
            Action::Cut(_) => "cut",
            Action::Restore(_) => "restore",
        }
    }
}

impl Action {
    /// The selection of nodes the action acts on (`None`: join, partition
    /// and heal name theirs otherwise).
    pub fn selection(&self) -> Option<&Selection> {
        match self {
            Action::Kill(s)
            | Action::Stop(s)
            | Action::Restart(s)
            | Action::Fault(s, _)
            | Action::Clear(s)
            | Action::Link(s, _)
            | Action::Cut(s)
            | Action::Restore(s) => Some(s),
            Action::Join(_) | Action::Partition(_) | Action::Heal => None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Kill(s)
            | Action::Stop(s)
            | Action::Restart(s)
            | Action::Clear(s)
            | Action::Cut(s)
            | Action::Restore(s) => {
                write!(f, "{} {s}", self.name())
            }
            Action::Fault(s, spec) => write!(f, "fault {spec} on {s}"),
            Action::Partition(groups) => {
                let g: Vec<String> =
                    groups.iter().map(|g| Selection::Nodes(g.clone()).to_string()).collect();
                write!(f, "partition {}", g.join(" | "))
            }
            Action::Heal => f.write_str("heal"),
            Action::Join(nodes) => write!(f, "join {}", Selection::Nodes(nodes.clone())),
            Action::Link(s, change) => write!(f, "link {change} on {s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub when: When,
    pub action: Action,
    pub label: String,
}

/// A checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub description: String,
    /// Running nodes to act on through their APIs; `None`: a [cluster]
    /// started here.
    pub attach: Option<AttachFile>,
    pub netns: bool,
    /// The data-less relays, resolved when the nodes' ids are known (a
    /// degree selection reads the topology over them).
    pub relays: Option<Selection>,
    /// The nodes a `join` event starts; not started with the others.
    pub late: BTreeSet<usize>,
    pub events: Vec<Event>,
    pub expect: Expect,
}

/// Parses and checks a scenario for a cluster of `nodes` (read from its
/// options by the caller). Every error names the event and the bad value.
pub fn parse(
    text: &str,
    nodes: impl FnOnce(&toml::Table) -> Result<usize, String>,
) -> Result<Scenario, String> {
    let file: ScenarioFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let n = match &file.attach {
        Some(a) => attached(&file, a)?,
        None => nodes(&file.cluster)?,
    };
    let attach = file.attach.is_some();
    let events = file
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            event(e, n, file.netns, attach)
                .map_err(|m| format!("event {} ({}): {m}", i + 1, e.action))
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (key, v) in [("min_accuracy", file.expect.min_accuracy), ("max_drop", file.expect.max_drop)]
    {
        if let Some(v) = v.filter(|v| !(0.0..=1.0).contains(v)) {
            return Err(format!("expect.{key} must be within 0..1 (got {v})"));
        }
    }
    if file.netns && n > super::netns::MAX_HOSTS {
        return Err(format!("netns: {n} nodes do not fit (at most {})", super::netns::MAX_HOSTS));
    }
    let relays = file.relays.as_ref().map(|v| relays(v, n)).transpose()?;
    let late = late_nodes(&events, n)?;
    Ok(Scenario {
        description: file.description,
        attach: file.attach,
        netns: file.netns,
        relays,
        late,
        events,
        expect: file.expect,
    })
}

/// The nodes `join` events start, checked: each joins once, at least one
/// node starts with the run, and no event before a node's join names it.
fn late_nodes(events: &[Event], n: usize) -> Result<BTreeSet<usize>, String> {
    let mut late = BTreeSet::new();
    for (k, e) in events.iter().enumerate() {
        if let Action::Join(nodes) = &e.action {
            for &i in nodes {
                if !late.insert(i) {
                    return Err(format!("event {} (join): node {i} joins twice", k + 1));
                }
            }
        }
    }
    if late.len() == n {
        return Err(format!("every node joins later: at least one of the {n} must start the run"));
    }
    let mut joined = BTreeSet::new();
    for (k, e) in events.iter().enumerate() {
        let named: Vec<usize> = match (&e.action, e.action.selection()) {
            (Action::Join(nodes), _) => {
                joined.extend(nodes.iter().copied());
                continue;
            }
            (Action::Partition(groups), _) => groups.iter().flatten().copied().collect(),
            (_, Some(Selection::Nodes(s))) => s.iter().copied().collect(),
            _ => Vec::new(),
        };
        if let Some(i) = named.into_iter().find(|i| late.contains(i) && !joined.contains(i)) {
            return Err(format!(
                "event {} ({}): node {i} has not joined yet (a later join starts it)",
                k + 1,
                e.action.name()
            ));
        }
    }
    Ok(late)
}

/// Checks an [attach] scenario: what it may not have (a cluster to start,
/// namespaces, relays, expectations on the final models it cannot read),
/// and its addresses. The number of nodes.
fn attached(file: &ScenarioFile, a: &AttachFile) -> Result<usize, String> {
    let refuse = |what: &str| {
        Err(format!(
            "[attach] acts on running nodes through their APIs: {what} needs a cluster started here ([cluster])"
        ))
    };
    if !file.cluster.is_empty() {
        return refuse("[cluster]");
    }
    if file.netns {
        return refuse("netns");
    }
    if file.relays.is_some() {
        return refuse("relays");
    }
    if file.expect.min_accuracy.is_some() || file.expect.max_drop.is_some() {
        return refuse("expect.min_accuracy or max_drop (the final models)");
    }
    if a.apis.is_empty() {
        return Err("[attach] apis = [] names no node".into());
    }
    let mut seen = BTreeSet::new();
    for api in &a.apis {
        let port = api.rsplit_once(':').and_then(|(h, p)| (!h.is_empty()).then_some(p));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none() {
            return Err(format!("[attach] apis: {api:?} is not host:port"));
        }
        if !seen.insert(api) {
            return Err(format!("[attach] apis: {api} is listed twice"));
        }
    }
    Ok(a.apis.len())
}

/// The relays' selection: nodes known before the run starts, and at least
/// one node left to hold the data.
fn relays(v: &toml::Value, n: usize) -> Result<Selection, String> {
    let sel = selection(v, n).map_err(|m| format!("relays: {m}"))?;
    let Some(count) = sel.count() else {
        return Err(format!(
            "relays = {v}: relays are chosen before the run, as a list, \"hubs:K\", \"leaves:K\" or \"random:K\""
        ));
    };
    if count >= n {
        return Err(format!(
            "relays = {v} makes all {n} nodes relays; at least one must hold the data"
        ));
    }
    Ok(sel)
}

fn event(e: &EventFile, n: usize, netns: bool, attach: bool) -> Result<Event, String> {
    let when = match (e.round, e.secs) {
        (Some(r), None) if r >= 0 => When::Round(r as u64),
        (Some(r), None) => return Err(format!("round must be >= 0 (got {r})")),
        (None, Some(s)) if s.is_finite() && (0.0..=86_400.0).contains(&s) => {
            When::After(Duration::from_secs_f64(s))
        }
        (None, Some(s)) => return Err(format!("secs must be within 0..86400 (got {s})")),
        (Some(_), Some(_)) => return Err("give round or secs, not both".into()),
        (None, None) => return Err("needs round = N or secs = S".into()),
    };
    let nodes = || -> Result<Selection, String> {
        let v = e.nodes.as_ref().ok_or("needs nodes = [..] or \"all\", \"hubs:K\", ...")?;
        let s = selection(v, n)?;
        if attach && matches!(s, Selection::Hubs(_) | Selection::Leaves(_)) {
            return Err(format!(
                "nodes = {v}: the topology of attached nodes is not known here; name them by index"
            ));
        }
        Ok(s)
    };
    let unused = |key: &str, given: bool| {
        if given { Err(format!("{key} is not an option of {}", e.action)) } else { Ok(()) }
    };
    let action = match e.action.as_str() {
        "kill" | "restart" | "join" | "link" | "cut" | "restore" if attach => {
            return Err(format!(
                "{} needs a node's process or link; with [attach] murmur chaos reaches the nodes through their APIs: {ATTACHED_ACTIONS}",
                e.action
            ));
        }
        "link" | "cut" | "restore" if !netns => {
            return Err(format!(
                "{} acts on real links between namespaces: set netns = true at the top of the scenario (or run with --netns)",
                e.action
            ));
        }
        "link" => {
            unused("groups", e.groups.is_some())?;
            let loss = match e.loss {
                Some(l) if !(0.0..=1.0).contains(&l) => {
                    return Err(format!("loss must be within 0..1 (got {l})"));
                }
                l => l,
            };
            let rate_bits = match e.rate.as_deref() {
                None => None,
                Some("off") => Some(None),
                Some(r) => Some(Some(super::netns::parse_rate(r)?)),
            };
            if loss.is_none() && rate_bits.is_none() {
                return Err("needs loss = P and/or rate = \"100mbit\" (or \"off\")".into());
            }
            Action::Link(nodes()?, LinkChange { loss, rate_bits })
        }
        "cut" | "restore" => {
            unused("groups", e.groups.is_some())?;
            let s = nodes()?;
            if e.action == "cut" { Action::Cut(s) } else { Action::Restore(s) }
        }
        "join" => {
            unused("groups", e.groups.is_some())?;
            match nodes()? {
                Selection::Nodes(set) => Action::Join(set),
                other => {
                    return Err(format!(
                        "nodes = \"{other}\": join needs a list of node indices, as in [4, 5]"
                    ));
                }
            }
        }
        "kill" | "stop" | "restart" | "clear" | "fault" => {
            unused("groups", e.groups.is_some())?;
            let s = nodes()?;
            if s == Selection::Down && e.action != "restart" {
                return Err("nodes = \"killed\" only selects for restart".into());
            }
            match e.action.as_str() {
                "kill" => Action::Kill(s),
                "stop" => Action::Stop(s),
                "restart" => Action::Restart(s),
                "clear" => Action::Clear(s),
                _ => {
                    let text =
                        e.fault.as_deref().ok_or("needs fault = \"SPEC\", as in \"drop:0.3\"")?;
                    let spec: FaultSpec =
                        text.parse().map_err(|m| format!("fault {text:?}: {m}"))?;
                    if matches!(spec.kind, FaultKind::Partition { .. }) {
                        return Err(format!(
                            "fault {text:?}: use action = \"partition\" with groups of node indices"
                        ));
                    }
                    Action::Fault(s, spec)
                }
            }
        }
        "partition" => {
            unused("nodes", e.nodes.is_some())?;
            let groups = e.groups.as_ref().ok_or("needs groups = [[0, 1], [2, 3]]")?;
            Action::Partition(partition(groups, n)?)
        }
        "heal" => {
            unused("nodes", e.nodes.is_some())?;
            unused("groups", e.groups.is_some())?;
            Action::Heal
        }
        other => {
            return Err(format!(
                "unknown action {other:?} (expected kill, stop, restart, join, fault, clear, partition, heal, link, cut or restore)"
            ));
        }
    };
    if e.fault.is_some() && !matches!(action, Action::Fault(..)) {
        return Err(format!("fault is not an option of {}", e.action));
    }
    if (e.loss.is_some() || e.rate.is_some()) && !matches!(action, Action::Link(..)) {
        let key = if e.loss.is_some() { "loss" } else { "rate" };
        return Err(format!("{key} is not an option of {}", e.action));
    }
    let label = e.label.clone().unwrap_or_else(|| action.to_string());
    Ok(Event { when, action, label })
}

fn index(v: i64, n: usize) -> Result<usize, String> {
    usize::try_from(v)
        .ok()
        .filter(|&i| i < n)
        .ok_or_else(|| format!("node {v} is not one of 0..{n}"))
}

fn selection(v: &toml::Value, n: usize) -> Result<Selection, String> {
    if let Some(list) = v.as_array() {
        let mut set = BTreeSet::new();
        for item in list {
            let i =
                item.as_integer().ok_or_else(|| format!("nodes: {item} is not a node index"))?;
            if !set.insert(index(i, n)?) {
                return Err(format!("nodes: node {i} is listed twice"));
            }
        }
        if set.is_empty() {
            return Err("nodes = [] selects nothing".into());
        }
        return Ok(Selection::Nodes(set));
    }
    let text = v.as_str().ok_or_else(|| format!("nodes = {v} must be a list or a string"))?;
    let count = |k: &str| -> Result<usize, String> {
        k.parse::<usize>()
            .ok()
            .filter(|&k| k >= 1 && k <= n)
            .ok_or_else(|| format!("nodes = {text:?}: K must be within 1..={n} (got {k:?})"))
    };
    match text.split_once(':') {
        None if text == "all" => Ok(Selection::All),
        None if text == "killed" => Ok(Selection::Down),
        Some(("hubs", k)) => Ok(Selection::Hubs(count(k)?)),
        Some(("leaves", k)) => Ok(Selection::Leaves(count(k)?)),
        Some(("random", k)) => Ok(Selection::Random(count(k)?)),
        _ => Err(format!(
            "nodes = {text:?} must be a list of indices, \"all\", \"killed\", \"hubs:K\", \"leaves:K\" or \"random:K\""
        )),
    }
}

fn partition(groups: &[Vec<i64>], n: usize) -> Result<Vec<BTreeSet<usize>>, String> {
    if groups.len() < 2 {
        return Err(format!("groups needs at least two groups (got {})", groups.len()));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for g in groups {
        let mut set = BTreeSet::new();
        for &i in g {
            let i = index(i, n)?;
            if !seen.insert(i) {
                return Err(format!("groups: node {i} is in two groups"));
            }
            set.insert(i);
        }
        if set.is_empty() {
            return Err("groups: a group is empty".into());
        }
        out.push(set);
    }
    Ok(out)
}

impl Selection {
    /// The node indices this selection names, given each node's degree in
    /// topology order (`order[p]` = the node at position p, `degree[p]` its
    /// degree), which nodes are down, and the run's seed.
    pub fn resolve(
        &self,
        n: usize,
        order: &[usize],
        degree: &[usize],
        down: &BTreeSet<usize>,
        seed: u64,
    ) -> BTreeSet<usize> {
        match self {
            Selection::Nodes(s) => s.clone(),
            Selection::All => (0..n).collect(),
            Selection::Down => down.clone(),
            Selection::Hubs(k) | Selection::Leaves(k) => {
                let mut pos: Vec<usize> = (0..order.len()).collect();
                // Stable: ties keep topology order.
                if matches!(self, Selection::Hubs(_)) {
                    pos.sort_by_key(|&p| std::cmp::Reverse(degree[p]));
                } else {
                    pos.sort_by_key(|&p| degree[p]);
                }
                pos.into_iter().take(*k).map(|p| order[p]).collect()
            }
            Selection::Random(k) => {
                use rand::SeedableRng;
                use rand::seq::SliceRandom;
                let mut all: Vec<usize> = (0..n).collect();
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xC4A0_5EED);
                all.shuffle(&mut rng);
                all.into_iter().take(*k).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eight(_: &toml::Table) -> Result<usize, String> {
        Ok(8)
    }

    fn err(text: &str) -> String {
        parse(text, eight).unwrap_err()
    }

    #[test]
    fn a_full_scenario_parses() {
        let s = parse(
            r#"
            description = "d"
            relays = "hubs:2"
            [cluster]
            nodes = 8
            [[event]]
            round = 5
            action = "kill"
            nodes = "hubs:2"
            [[event]]
            secs = 1.5
            action = "fault"
            nodes = [1, 2]
            fault = "drop:0.3"
            [[event]]
            round = 6
            action = "partition"
            groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
            label = "halves"
            [[event]]
            round = 9
            action = "heal"
            [[event]]
            round = 10
            action = "restart"
            nodes = "killed"
            [expect]
            min_accuracy = 0.8
            "#,
            eight,
        )
        .unwrap();
        assert_eq!(s.events.len(), 5);
        assert_eq!(s.relays, Some(Selection::Hubs(2)));
        assert_eq!(s.events[0].action, Action::Kill(Selection::Hubs(2)));
        assert_eq!(s.events[1].when, When::After(Duration::from_millis(1500)));
        assert_eq!(s.events[1].label, "fault drop:0.3 on [1, 2]");
        assert_eq!(s.events[2].label, "halves");
        assert_eq!(s.events[4].action, Action::Restart(Selection::Down));
        assert!(s.expect.survivors_finish);
        assert_eq!(s.expect.min_accuracy, Some(0.8));
    }

    #[test]
    fn joiners_start_late_and_nothing_names_them_before_their_join() {
        let s = parse(
            r#"
            [[event]]
            round = 5
            action = "kill"
            nodes = [1]
            [[event]]
            round = 10
            action = "join"
            nodes = [6, 7]
            [[event]]
            round = 12
            action = "fault"
            nodes = [7]
            fault = "drop:0.3"
            "#,
            eight,
        )
        .unwrap();
        assert_eq!(s.late, BTreeSet::from([6, 7]));
        assert_eq!(s.events[1].action, Action::Join(BTreeSet::from([6, 7])));
        assert_eq!(s.events[1].label, "join [6, 7]");
        let early = "[[event]]\nround = 2\naction = \"stop\"\nnodes = [6]\n\
                     [[event]]\nround = 4\naction = \"join\"\nnodes = [6]";
        assert!(err(early).contains("event 1 (stop): node 6 has not joined yet"), "{}", err(early));
        let twice = "[[event]]\nround = 2\naction = \"join\"\nnodes = [6]\n\
                     [[event]]\nround = 4\naction = \"join\"\nnodes = [6]";
        assert!(err(twice).contains("event 2 (join): node 6 joins twice"), "{}", err(twice));
        let random = "[[event]]\nround = 2\naction = \"join\"\nnodes = \"random:2\"";
        assert!(err(random).contains("nodes = \"random:2\": join needs a list"), "{}", err(random));
        let all = "[[event]]\nround = 2\naction = \"join\"\nnodes = [0, 1, 2, 3, 4, 5, 6, 7]";
        assert!(err(all).contains("at least one of the 8 must start"), "{}", err(all));
    }

    #[test]
    fn link_events_parse_with_netns() {
        let s = parse(
            r#"
            netns = true
            [[event]]
            round = 0
            action = "link"
            nodes = "all"
            loss = 0.05
            rate = "100mbit"
            [[event]]
            round = 4
            action = "cut"
            nodes = [2]
            [[event]]
            round = 8
            action = "restore"
            nodes = [2]
            [[event]]
            round = 9
            action = "link"
            nodes = "all"
            rate = "off"
            "#,
            eight,
        )
        .unwrap();
        assert!(s.netns);
        let change = LinkChange { loss: Some(0.05), rate_bits: Some(Some(100_000_000)) };
        assert_eq!(s.events[0].action, Action::Link(Selection::All, change));
        assert_eq!(s.events[0].label, "link loss 5.0%, rate 100mbit on all");
        assert_eq!(s.events[1].action, Action::Cut(Selection::Nodes(BTreeSet::from([2]))));
        assert_eq!(s.events[3].label, "link rate off on all");
    }

    #[test]
    fn errors_name_the_event_and_the_bad_value() {
        let cases = [
            (
                "[[event]]\nround = 1\naction = \"explode\"\nnodes = [1]",
                "event 1 (explode): unknown action \"explode\"",
            ),
            ("[[event]]\nround = 1\naction = \"kill\"\nnodes = [9]", "node 9 is not one of 0..8"),
            ("[[event]]\nround = 1\naction = \"kill\"\nnodes = [1, 1]", "node 1 is listed twice"),
            (
                "[[event]]\nround = 1\naction = \"kill\"\nnodes = \"hubs:0\"",
                "K must be within 1..=8 (got \"0\")",
            ),
            (
                "[[event]]\nround = 1\naction = \"kill\"\nnodes = \"middle:2\"",
                "nodes = \"middle:2\" must be",
            ),
            (
                "[[event]]\nround = -1\naction = \"kill\"\nnodes = [1]",
                "round must be >= 0 (got -1)",
            ),
            ("[[event]]\nround = 1\nsecs = 2.0\naction = \"kill\"\nnodes = [1]", "not both"),
            ("[[event]]\naction = \"kill\"\nnodes = [1]", "needs round = N or secs = S"),
            (
                "[[event]]\nround = 1\naction = \"fault\"\nnodes = [1]\nfault = \"drop:2\"",
                "fault \"drop:2\"",
            ),
            (
                "[[event]]\nround = 1\naction = \"kill\"\nnodes = [1]\nfault = \"nan\"",
                "fault is not an option of kill",
            ),
            (
                "[[event]]\nround = 1\naction = \"partition\"\ngroups = [[0, 1], [1, 2]]",
                "node 1 is in two groups",
            ),
            (
                "[[event]]\nround = 1\naction = \"partition\"\ngroups = [[0, 1]]",
                "at least two groups (got 1)",
            ),
            (
                "[[event]]\nround = 1\naction = \"heal\"\nnodes = [1]",
                "nodes is not an option of heal",
            ),
            (
                "[[event]]\nround = 1\naction = \"kill\"\nnodes = \"killed\"",
                "only selects for restart",
            ),
            ("[[event]]\nround = 1\naction = \"kill\"\nwhom = [1]", "unknown field `whom`"),
            ("relays = \"all\"", "relays are chosen before the run"),
            ("relays = \"killed\"", "relays are chosen before the run"),
            ("relays = \"hubs:8\"", "makes all 8 nodes relays"),
            ("relays = [0, 9]", "relays: node 9 is not one of 0..8"),
            ("[expect]\nmin_accuracy = 3.0", "expect.min_accuracy must be within 0..1 (got 3)"),
            ("[[event]]\nround = 1\naction = \"cut\"\nnodes = [1]", "set netns = true"),
            ("netns = true\n[[event]]\nround = 1\naction = \"link\"\nnodes = [1]", "needs loss"),
            (
                "netns = true\n[[event]]\nround = 1\naction = \"link\"\nnodes = \"all\"\nloss = 1.5",
                "loss must be within 0..1 (got 1.5)",
            ),
            (
                "netns = true\n[[event]]\nround = 1\naction = \"link\"\nnodes = \"all\"\nrate = \"fast\"",
                "rate \"fast\"",
            ),
            (
                "netns = true\n[[event]]\nround = 1\naction = \"cut\"\nnodes = [1]\nloss = 0.1",
                "loss is not an option of cut",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "{text:?}: {got:?} does not contain {want:?}");
        }
    }

    #[test]
    fn attached_nodes_take_what_their_apis_offer_only() {
        let s = parse(
            r#"
            [attach]
            apis = ["127.0.0.1:7070", "10.0.0.2:7070", "node-2:7070"]
            [[event]]
            round = 3
            action = "fault"
            nodes = [1]
            fault = "drop:0.3"
            [[event]]
            round = 6
            action = "stop"
            nodes = "random:1"
            "#,
            |_| Err("an attached scenario has no [cluster] to read".into()),
        )
        .unwrap();
        assert_eq!(s.attach.map(|a| a.apis.len()), Some(3));
        assert_eq!(s.events[1].action, Action::Stop(Selection::Random(1)));
        let attach = "[attach]\napis = [\"127.0.0.1:7070\", \"127.0.0.1:7071\"]\n";
        let cases = [
            ("[[event]]\nround = 1\naction = \"kill\"\nnodes = [1]", "kill needs a node's process"),
            ("[[event]]\nround = 1\naction = \"restart\"\nnodes = [1]", "fault, clear, partition"),
            ("[[event]]\nround = 1\naction = \"join\"\nnodes = [1]", "join needs a node's process"),
            ("[[event]]\nround = 1\naction = \"stop\"\nnodes = \"hubs:1\"", "name them by index"),
            ("[[event]]\nround = 1\naction = \"stop\"\nnodes = [2]", "node 2 is not one of 0..2"),
            ("[expect]\nmin_accuracy = 0.5", "expect.min_accuracy or max_drop"),
            ("[cluster]\nnodes = 2", "[cluster] needs a cluster started here"),
        ];
        for (text, want) in cases {
            let got = parse(&format!("{attach}{text}"), eight).unwrap_err();
            assert!(got.contains(want), "{text:?}: {got:?} does not contain {want:?}");
        }
        for (apis, want) in [
            ("[]", "names no node"),
            ("[\"7070\"]", "\"7070\" is not host:port"),
            ("[\"a:1\", \"a:1\"]", "a:1 is listed twice"),
        ] {
            let got = parse(&format!("[attach]\napis = {apis}"), eight).unwrap_err();
            assert!(got.contains(want), "{apis}: {got:?}");
        }
    }

    #[test]
    fn selections_resolve_by_degree_position_and_seed() {
        // Positions 0..4 hold nodes 3, 0, 2, 1; degrees 1, 3, 2, 1.
        let order = [3, 0, 2, 1];
        let degree = [1, 3, 2, 1];
        let down = BTreeSet::from([2]);
        let r = |s: Selection| s.resolve(4, &order, &degree, &down, 7);
        assert_eq!(r(Selection::Hubs(2)), BTreeSet::from([0, 2]));
        assert_eq!(r(Selection::Leaves(2)), BTreeSet::from([3, 1]));
        assert_eq!(r(Selection::Down), down);
        assert_eq!(r(Selection::All).len(), 4);
        let a = r(Selection::Random(2));
        assert_eq!(a.len(), 2);
        assert_eq!(a, r(Selection::Random(2)), "the same seed draws the same nodes");
    }
}
