//! A shard of a simulation: some of its nodes, their queue of events, and
//! what happened to them, run by one thread (see `sim`'s module docs).
//!
//! Why shards: at 100,000 nodes a run is millions of deliveries, each
//! bound by memory latency on its receiver's cold state, and one thread
//! leaves the machine's other cores idle. A shard only ever touches its own
//! nodes. An event another shard's node must handle (a message to it) goes
//! to an outbox, handed over between windows of virtual time shorter than
//! the least network delay, so it can never be due inside the window that
//! sent it. Nothing a shard does depends on which shard a node is in: a
//! message's fate is drawn from its sender and the sender's count of sends
//! (`fate`), not from a shared generator, and events at the same time are
//! ordered by their origin, so a run gives the same nodes the same events
//! whatever the number of shards.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::event_queue::EventQueue;
use super::mixer::{Action, Input, Message, Mixer};
use super::sim::{DelayRange, EvalRecord, LocalUpdate, MessageCounts, SimConfig, SimError};
use crate::net::encoding;

#[derive(Debug)]
pub(super) enum Event {
    /// Phase `phase` of `node`'s local training ends.
    LocalDone {
        node: usize,
        phase: u64,
    },
    Deliver {
        to: usize,
        msg: Message,
    },
    Tick {
        node: usize,
    },
    /// A message for the hub.
    ToHub {
        msg: Message,
    },
    HubTick,
    Members,
}

impl Event {
    /// The node that handles it; `None` for the hub's and `Members`.
    fn node(&self) -> Option<usize> {
        match *self {
            Event::LocalDone { node, .. } | Event::Tick { node } => Some(node),
            Event::Deliver { to, .. } => Some(to),
            Event::ToHub { .. } | Event::HubTick | Event::Members => None,
        }
    }
}

/// An event bound for another shard: when, its tie order, what.
pub(super) type Handover = (Duration, u64, Event);

pub(super) struct NodeState {
    pub(super) id: PeerId,
    pub(super) mixer: Box<dyn Mixer>,
    pub(super) params: Vec<f32>,
    pub(super) step_time: Duration,
    /// When the earliest `Tick` still to come is; other ticks are stale.
    tick_at: Option<Duration>,
    /// The deadline the last `Tick` handed to the mixer was for: a
    /// deadline that does not move after its `Tick` gets no second one.
    ticked_at: Option<Duration>,
    /// Bumped per `Train` as it starts: a `LocalDone` event names the
    /// phase it ends.
    phase: u64,
    /// Steps of the current local phase.
    pending_steps: u64,
    /// A local phase is under way.
    busy: bool,
    /// What the strategy asked of the trainer behind the phase under way
    /// (`overlap` queues the next phase and a mix's change during one),
    /// carried out in order when it ends, as the daemon's trainer does.
    queued: VecDeque<Action>,
    crash_round: Option<u64>,
    pub(super) crashed_at_round: Option<u64>,
    pub(super) finished_at: Option<Duration>,
    /// Its strategy's `round()` as its shard's `at_round` counts it.
    round: u64,
    /// Events it has caused so far: the tie order of the next one, and the
    /// draw of its next message's fate.
    caused: u64,
}

impl NodeState {
    pub(super) fn new(
        id: PeerId,
        mixer: Box<dyn Mixer>,
        params: Vec<f32>,
        step_time: Duration,
        crash_round: Option<u64>,
    ) -> NodeState {
        NodeState {
            id,
            mixer,
            params,
            step_time,
            tick_at: None,
            ticked_at: None,
            phase: 0,
            pending_steps: 0,
            busy: false,
            queued: VecDeque::new(),
            crash_round,
            crashed_at_round: None,
            finished_at: None,
            round: 0,
            caused: 0,
        }
    }

    pub(super) fn live(&self) -> bool {
        self.crashed_at_round.is_none()
    }

    /// Counts one more event it caused; returns that event's count.
    fn next_cause(&mut self) -> u64 {
        self.caused += 1;
        self.caused - 1
    }
}

/// What every shard reads and none changes.
pub(super) struct Shared {
    pub(super) cfg: SimConfig,
    pub(super) base: Instant,
    /// Node index by peer id.
    pub(super) index: HashMap<PeerId, usize>,
    /// The hub's peer id, if one takes part (then there is one shard).
    pub(super) hub: Option<PeerId>,
    /// Nodes per shard (the last may hold fewer).
    pub(super) per_shard: usize,
}

/// The tie order of the `count`-th event caused by `origin` (a node's
/// index; the hub's is the node count): events at the same virtual time
/// come out by origin, then in the order their origin caused them.
pub(super) fn order(origin: usize, count: u64) -> u64 {
    ((origin as u64) << 32) | (count & 0xffff_ffff)
}

/// Whether the `count`-th message sent by `origin` is lost, else its delay:
/// a pure function of the seed, the sender and its count, so that it does
/// not depend on the order in which shards send.
pub(super) fn fate(cfg: &SimConfig, origin: usize, count: u64) -> Option<Duration> {
    let h = splitmix(splitmix(cfg.seed ^ (origin as u64).rotate_left(32)) ^ count);
    // 53 random bits: a uniform draw from [0, 1).
    let lost = ((h >> 11) as f64 / (1u64 << 53) as f64) < cfg.loss;
    let DelayRange { min, max } = cfg.delay;
    let (min, span) = (min.as_nanos(), max.as_nanos() - min.as_nanos() + 1);
    // The high half of a 64 x span product: uniform over the span.
    let delay = min + ((u128::from(splitmix(h)) * span) >> 64);
    (!lost).then(|| Duration::from_nanos(u64::try_from(delay).unwrap_or(u64::MAX)))
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `z`.
fn splitmix(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub(super) struct Shard {
    /// The index of `nodes[0]` among all nodes.
    pub(super) first: usize,
    pub(super) nodes: Vec<NodeState>,
    queue: EventQueue<Event>,
    pub(super) now: Duration,
    /// Events for other shards' nodes, by shard, and the earliest of them.
    outbox: Vec<Vec<Handover>>,
    outbox_first: Option<Duration>,
    /// Events other shards sent, queued when this shard next runs.
    inbound: Vec<Vec<Handover>>,
    pub(super) messages: MessageCounts,
    /// How many of its live nodes are in each round (no zero counts), and
    /// how many live nodes have not finished: kept as events happen, so
    /// that an event costs its node, not a scan of the swarm.
    pub(super) at_round: BTreeMap<u64, usize>,
    pub(super) unfinished: usize,
    pub(super) evaluations: Vec<EvalRecord>,
    /// The node a window is running and the window's end: what that node
    /// causes for itself before the end goes to `own`, not the queue.
    running: Option<(usize, Duration)>,
    /// The running node's own events due in the window (a phase's end, a
    /// tick): a few at most.
    own: Vec<Handover>,
    /// With a hub: the nodes whose round moved since the hub last heard
    /// (it hears of them at once, of the others once a heartbeat).
    pub(super) round_changes: Option<Vec<usize>>,
}

impl Shard {
    pub(super) fn new(first: usize, nodes: Vec<NodeState>, shards: usize) -> Shard {
        let live = nodes.len();
        Shard {
            first,
            nodes,
            queue: EventQueue::default(),
            now: Duration::ZERO,
            outbox: (0..shards).map(|_| Vec::new()).collect(),
            outbox_first: None,
            inbound: Vec::new(),
            messages: MessageCounts::default(),
            at_round: BTreeMap::from([(0, live)]),
            unfinished: live,
            evaluations: Vec::new(),
            running: None,
            own: Vec::new(),
            round_changes: None,
        }
    }

    fn node(&mut self, i: usize) -> &mut NodeState {
        &mut self.nodes[i - self.first]
    }

    fn node_ref(&self, i: usize) -> &NodeState {
        &self.nodes[i - self.first]
    }

    fn instant(&self, ctx: &Shared) -> Instant {
        ctx.base + self.now
    }

    /// Starts every node (or crashes it, if it crashes at round 0).
    pub(super) fn start(
        &mut self,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        for i in self.first..self.first + self.nodes.len() {
            if self.node(i).crash_round == Some(0) {
                self.crash(i, ctx);
                continue;
            }
            let now = self.instant(ctx);
            let n = self.node(i);
            n.mixer.set_start_params(&n.params);
            let actions = n.mixer.start(now);
            self.after(i, actions, ctx, local)?;
        }
        Ok(())
    }

    /// When this shard's next event is due, here or in its outbox.
    pub(super) fn next_time(&self) -> Option<Duration> {
        let queued = self.queue.peek_time();
        match (queued, self.outbox_first) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next event, its time now this shard's.
    pub(super) fn pop(&mut self) -> Option<(Duration, Event)> {
        let (at, event) = self.queue.pop()?;
        self.now = at;
        Some((at, event))
    }

    pub(super) fn push(&mut self, at: Duration, order: u64, event: Event) {
        self.queue.push(at, order, event);
    }

    /// Handles every event due before `end` (the window's work; what other
    /// shards sent comes first into the queue) node by node: the nodes in
    /// index order, each node's events in time order.
    ///
    /// Why node by node, and why it is exact: every message takes at least
    /// the window to arrive, so nothing a node does in a window reaches
    /// another node inside it. Each node sees the events it would see in
    /// time order, in the same order, and the run is the same to the bit.
    /// In time order a node of a 100,000-node exponential graph is handled
    /// several times a window, each time from cold memory; node by node
    /// its state is read once for all of them.
    pub(super) fn run_until(
        &mut self,
        end: Duration,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        for (at, order, event) in std::mem::take(&mut self.inbound).into_iter().flatten() {
            self.queue.push(at, order, event);
        }
        let mut due: Vec<Option<Handover>> = Vec::new();
        while self.queue.peek_time().is_some_and(|at| at < end) {
            due.push(self.queue.pop_ordered());
        }
        // Each event's node, then its place in time order, in one word.
        let mut by_node: Vec<u64> = due
            .iter()
            .enumerate()
            .map(|(k, e)| {
                let node = e.as_ref().and_then(|(_, _, e)| e.node()).unwrap_or(u32::MAX as usize);
                ((node as u64) << 32) | k as u64
            })
            .collect();
        by_node.sort_unstable();
        let mut latest = self.now;
        for group in by_node.chunk_by(|a, b| a >> 32 == b >> 32) {
            let node = (group[0] >> 32) as usize;
            let events = group.iter().filter_map(|&k| due[k as u32 as usize].take());
            self.running = Some((node, end));
            let ran = self.run_node(events, ctx, local);
            self.running = None;
            ran?;
            latest = latest.max(self.now);
        }
        self.now = latest;
        Ok(())
    }

    /// Handles the running node's `events` (in time order) and what it
    /// causes itself inside the window (`own`), merged by time and order.
    fn run_node(
        &mut self,
        mut events: impl Iterator<Item = Handover>,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        let key = |(at, order, _): &Handover| (*at, *order);
        let mut queued = events.next();
        loop {
            let own = (0..self.own.len()).min_by_key(|&i| key(&self.own[i]));
            let own_first =
                own.filter(|&i| queued.as_ref().is_none_or(|q| key(&self.own[i]) < key(q)));
            let next = match own_first {
                Some(i) => Some(self.own.swap_remove(i)),
                None => std::mem::replace(&mut queued, events.next()),
            };
            let Some((at, _, event)) = next else { return Ok(()) };
            self.now = at;
            self.dispatch(event, ctx, local)?;
        }
    }

    /// Takes the events bound for other shards, by shard.
    pub(super) fn take_outbox(&mut self) -> Vec<Vec<Handover>> {
        self.outbox_first = None;
        self.outbox.iter_mut().map(std::mem::take).collect()
    }

    /// Events from another shard, for its next window.
    pub(super) fn receive(&mut self, events: Vec<Handover>) {
        if !events.is_empty() {
            self.inbound.push(events);
        }
    }

    /// Messages still travelling: in the queue or on their way to it.
    pub(super) fn in_flight(&self) -> usize {
        let travelling = |e: &Event| matches!(e, Event::Deliver { .. } | Event::ToHub { .. });
        let handed = self.inbound.iter().chain(&self.outbox).flatten();
        self.queue.iter().filter(|e| travelling(e)).count()
            + handed.filter(|(_, _, e)| travelling(e)).count()
    }

    /// A node's event (the hub's and `Members` are the simulator's).
    pub(super) fn dispatch(
        &mut self,
        event: Event,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        match event {
            Event::LocalDone { node, phase } => self.local_done(node, phase, ctx, local),
            Event::Deliver { to, msg } => {
                if !self.node_ref(to).live() {
                    self.messages.to_crashed += 1;
                    return Ok(());
                }
                self.messages.delivered += 1;
                self.handle(to, Input::Received(msg), ctx, local)
            }
            Event::Tick { node } => {
                let now = self.now;
                let n = self.node(node);
                if !n.live() || n.tick_at != Some(now) {
                    return Ok(());
                }
                n.tick_at = None;
                if self.deadline(node, ctx).is_some_and(|d| d > now) {
                    // Answers moved the deadline on since this was set.
                    self.reschedule_tick(node, ctx);
                    return Ok(());
                }
                self.node(node).ticked_at = Some(now);
                self.handle(node, Input::Tick, ctx, local)
            }
            Event::ToHub { .. } | Event::HubTick | Event::Members => Ok(()),
        }
    }

    /// Local phase `phase` of `node` ends now: train, then report it.
    fn local_done(
        &mut self,
        node: usize,
        phase: u64,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        let n = self.node(node);
        if !n.live() || n.phase != phase {
            return Ok(());
        }
        let steps = n.pending_steps;
        let samples = local.train(node, &mut n.params, steps)?;
        let params = n.params.clone();
        n.busy = false;
        while !self.node_ref(node).busy
            && let Some(a) = self.node(node).queued.pop_front()
        {
            self.act(node, a, ctx, local)?;
        }
        self.handle(node, Input::LocalDone { params, samples }, ctx, local)
    }

    pub(super) fn handle(
        &mut self,
        node: usize,
        input: Input,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        let now = self.instant(ctx);
        let actions = self.node(node).mixer.handle(input, now);
        self.after(node, actions, ctx, local)
    }

    /// Carries out `actions` of `node` unless they took it to its crash
    /// round, then keeps its `Tick` in step with its deadline.
    fn after(
        &mut self,
        node: usize,
        actions: Vec<Action>,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        self.track_round(node);
        let n = self.node_ref(node);
        if n.crash_round.is_some_and(|r| n.mixer.round() >= r) {
            self.crash(node, ctx);
            return Ok(());
        }
        for a in actions {
            self.act(node, a, ctx, local)?;
        }
        self.reschedule_tick(node, ctx);
        Ok(())
    }

    fn act(
        &mut self,
        node: usize,
        action: Action,
        ctx: &Shared,
        local: &mut dyn LocalUpdate,
    ) -> Result<(), SimError> {
        let n = self.node(node);
        let behind_phase = matches!(action, Action::Shift(_) | Action::Train { .. })
            || !n.queued.is_empty() && !matches!(action, Action::Send(_) | Action::Finish);
        if n.busy && behind_phase {
            n.queued.push_back(action);
            return Ok(());
        }
        match action {
            Action::Send(m) => self.send(node, m, ctx),
            Action::SetParams(p) => self.node(node).params = p,
            Action::Shift(d) => {
                for (v, d) in self.node(node).params.iter_mut().zip(&d) {
                    *v += d;
                }
            }
            Action::Train { steps } => {
                let now = self.now;
                let n = self.node(node);
                n.busy = true;
                n.phase += 1;
                n.pending_steps = steps;
                let compute = n.step_time.as_secs_f64() * steps as f64;
                let at = now
                    .saturating_add(Duration::try_from_secs_f64(compute).unwrap_or(Duration::MAX));
                let phase = n.phase;
                self.cause(node, at, Event::LocalDone { node, phase }, ctx);
            }
            Action::Evaluate { label } => {
                if let Some(metric) = local.evaluate(node, &self.node_ref(node).params)? {
                    let round = self.node_ref(node).mixer.round();
                    self.evaluations.push(EvalRecord { node, round, label, metric });
                }
            }
            Action::Finish => {
                let now = self.now;
                let n = self.node(node);
                if n.finished_at.is_none() {
                    n.finished_at = Some(now);
                    self.unfinished -= 1;
                }
            }
        }
        Ok(())
    }

    /// Queues `event`, caused by `node`, at `at`: here if it is for one of
    /// this shard's nodes (or the hub), else in the outbox of its shard.
    fn cause(&mut self, node: usize, at: Duration, event: Event, ctx: &Shared) {
        let count = self.node(node).next_cause();
        self.route(at, order(node, count), event, ctx);
    }

    /// Only a delivery can be for another shard's node, and only the
    /// running node's own events can be due inside the window.
    fn route(&mut self, at: Duration, order: u64, event: Event, ctx: &Shared) {
        if let Some((node, end)) = self.running
            && at < end
        {
            debug_assert_eq!(
                event.node(),
                Some(node),
                "only a node's own event is due in its window"
            );
            self.own.push((at, order, event));
        } else if let Event::Deliver { to, .. } = &event
            && !(self.first..self.first + self.nodes.len()).contains(to)
        {
            self.outbox[to / ctx.per_shard].push((at, order, event));
            self.outbox_first = Some(self.outbox_first.map_or(at, |t| t.min(at)));
        } else {
            self.queue.push(at, order, event);
        }
    }

    /// Sends `m` from `node`: see `send_from`.
    fn send(&mut self, node: usize, m: Message, ctx: &Shared) {
        let n = self.node(node);
        let (id, count) = (n.id, n.next_cause());
        self.send_from(node, id, count, m, ctx);
    }

    /// Drops `m` (the `count`-th message of `origin`, whose peer id is
    /// `sender`) as its fate says, else delivers it after its delay.
    pub(super) fn send_from(
        &mut self,
        origin: usize,
        sender: PeerId,
        count: u64,
        mut m: Message,
        ctx: &Shared,
    ) {
        self.messages.sent += 1;
        let n = m.values.len();
        let on_wire = m.encoding.fit(n);
        self.messages.payload_bytes += on_wire.body_len(n).unwrap_or(0) as u64;
        // What the receiver decodes: the encoding's rounding is simulated too.
        if on_wire != encoding::Encoding::F32 {
            m.values = std::sync::Arc::new(encoding::round_trip(&m.values, on_wire));
        }
        let to_hub = ctx.hub == Some(m.peer);
        let to = ctx.index.get(&m.peer).copied();
        if to.is_none() && !to_hub {
            self.messages.unknown_peer += 1;
            return;
        }
        let Some(delay) = fate(&ctx.cfg, origin, count) else {
            self.messages.dropped += 1;
            return;
        };
        m.peer = sender;
        let event = match to {
            Some(to) => Event::Deliver { to, msg: m },
            None => Event::ToHub { msg: m },
        };
        self.route(self.now.saturating_add(delay), order(origin, count), event, ctx);
    }

    pub(super) fn crash(&mut self, node: usize, ctx: &Shared) {
        let n = self.node(node);
        if !n.live() {
            return;
        }
        let round = n.mixer.round();
        n.crashed_at_round = Some(round);
        n.queued.clear();
        let (counted, finished) = (n.round, n.finished_at.is_some());
        self.uncount(counted);
        if !finished {
            self.unfinished -= 1;
        }
        tracing::debug!(node, round, "simulated crash");
        if let Some(d) = ctx.cfg.membership_delay {
            let at = self.now.saturating_add(d);
            self.cause(node, at, Event::Members, ctx);
        }
    }

    /// Makes sure a `Tick` comes by `node`'s deadline. Every answer of an
    /// exchange moves the deadline later: a tick already set for earlier
    /// stands, and when it comes, sets the next one if the deadline is not
    /// yet due. One tick per answer would double the queue's traffic and
    /// fill it with stale ticks (a node of a 100,000-node exponential graph
    /// hears 34 answers an exchange).
    fn reschedule_tick(&mut self, node: usize, ctx: &Shared) {
        let Some(at) = self.deadline(node, ctx) else { return };
        let n = self.node(node);
        if n.ticked_at == Some(at) || n.tick_at.is_some_and(|pending| pending <= at) {
            return;
        }
        n.tick_at = Some(at);
        self.cause(node, at, Event::Tick { node }, ctx);
    }

    /// `node`'s mixer's deadline in simulated time (not before now).
    fn deadline(&self, node: usize, ctx: &Shared) -> Option<Duration> {
        let deadline = self.node_ref(node).mixer.deadline()?;
        Some(deadline.saturating_duration_since(ctx.base).max(self.now))
    }

    /// Moves a live `node` to its strategy's round in `at_round`.
    fn track_round(&mut self, node: usize) {
        let n = self.node(node);
        let (before, now) = (n.round, n.mixer.round());
        if !n.live() || before == now {
            return;
        }
        n.round = now;
        if let Some(changes) = &mut self.round_changes {
            changes.push(node);
        }
        self.uncount(before);
        *self.at_round.entry(now).or_default() += 1;
    }

    fn uncount(&mut self, round: u64) {
        if let Some(c) = self.at_round.get_mut(&round) {
            *c -= 1;
            if *c == 0 {
                self.at_round.remove(&round);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(loss: f64, min_ms: u64, max_ms: u64) -> SimConfig {
        let (min, max) = (Duration::from_millis(min_ms), Duration::from_millis(max_ms));
        SimConfig { seed: 5, loss, delay: DelayRange { min, max }, ..SimConfig::default() }
    }

    #[test]
    fn a_fate_is_a_function_of_seed_sender_and_count_and_keeps_to_the_config() {
        let c = cfg(0.3, 2, 6);
        let fates: Vec<_> = (0..20_000).map(|k| fate(&c, 17, k)).collect();
        assert_eq!(fates, (0..20_000).map(|k| fate(&c, 17, k)).collect::<Vec<_>>());
        assert_ne!(fates, (0..20_000).map(|k| fate(&c, 18, k)).collect::<Vec<_>>());
        let other_seed = SimConfig { seed: 6, ..c.clone() };
        assert_ne!(fates, (0..20_000).map(|k| fate(&other_seed, 17, k)).collect::<Vec<_>>());
        let lost = fates.iter().filter(|f| f.is_none()).count() as f64 / 20_000.0;
        assert!((0.28..0.32).contains(&lost), "lost {lost}");
        let delays: Vec<Duration> = fates.into_iter().flatten().collect();
        let (lo, hi) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        let ms = Duration::from_millis;
        assert!(*lo >= ms(2) && *lo < ms(2) + Duration::from_micros(10), "{lo:?}");
        assert!(*hi <= ms(6) && *hi > ms(6) - Duration::from_micros(10), "{hi:?}");
        let mean = delays.iter().sum::<Duration>().as_secs_f64() / delays.len() as f64;
        assert!((mean - 0.004).abs() < 0.0001, "mean delay {mean}");
        assert!((0..1000).all(|k| fate(&cfg(0.0, 1, 1), 3, k) == Some(ms(1))));
        assert!((0..1000).all(|k| fate(&cfg(1.0, 1, 10), 3, k).is_none()));
    }

    #[test]
    fn events_at_one_time_are_ordered_by_origin_then_by_count() {
        assert!(order(1, 5) < order(2, 0));
        assert!(order(2, 0) < order(2, 1));
        assert!(order(100_000, u64::from(u32::MAX)) < order(100_001, 0));
    }
}
