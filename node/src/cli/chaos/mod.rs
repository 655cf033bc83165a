//! `murmur chaos SCENARIO.toml`: a local cluster (as `murmur cluster`
//! starts one), or nodes already running reached through their APIs
//! (`[attach]`), and a timeline of failures across it, applied while it
//! trains; then a report of what the failures did, against the same run
//! without them when asked (`--baseline`). Several scenarios run one after
//! another and are compared side by side (`report::compare`).
//!
//! `scenario` reads and checks the file, `runner` starts the nodes and
//! applies the events (signals through the process manager, faults and
//! partitions through each node's gRPC API) while it samples every node's
//! status, and `report` writes report.json, report.md and chaos.svg.

mod netns;
mod report;
mod runner;
pub mod scenario;

use std::path::PathBuf;

use super::CliError;
use crate::daemon::config::RunOptions;
use crate::train::config::TrainOptions;
use scenario::Scenario;

#[derive(Debug, clap::Args)]
pub struct ChaosArgs {
    /// The scenario: [cluster] options, [[event]]s and [expect] (see deploy/scenarios/). Several are run one after another, each in OUT/<file stem>/, and compared in OUT/comparison.md
    #[arg(required = true, num_args = 1..)]
    scenarios: Vec<PathBuf>,
    /// Directory for the run: run/ (the faulted cluster), baseline/, report.md, report.json, chaos.svg
    #[arg(long, env = "MURMUR_OUT")]
    out: Option<PathBuf>,
    /// Check the scenario and print its timeline; start nothing
    #[arg(long)]
    check: bool,
    /// Also run the same cluster without the events, first, and compare
    #[arg(long)]
    baseline: bool,
    /// Override a [cluster] option, as in --set rounds=60 or --set data=mnist:DIR (a TOML value; quote a string that looks like a number: --set 'straggler-grace="0.2"'); repeatable
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run every node in a network namespace of its own (as netns = true in the scenario; needs root)
    #[arg(long)]
    netns: bool,
}

/// The scenario's text with `--set` overrides written into [cluster], and
/// `netns = true` with `--netns`. A value is read as TOML (60, 0.5, true,
/// "x") or else taken as a string.
fn with_overrides(text: &str, set: &[String], netns: bool) -> Result<String, String> {
    if set.is_empty() && !netns {
        return Ok(text.to_string());
    }
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| e.message().to_string())?;
    if netns {
        doc.insert("netns".into(), toml::Value::Boolean(true));
    }
    let cluster = doc
        .entry("cluster")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .ok_or("cluster must be a table")?;
    for kv in set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--set {kv:?} must be KEY=VALUE, as in rounds=60"))?;
        let value = toml::from_str::<toml::Table>(&format!("v = {v}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(v.to_string()));
        cluster.insert(k.trim().to_string(), value);
    }
    toml::to_string(&doc).map_err(|e| e.to_string())
}

pub fn run(args: ChaosArgs) -> Result<(), CliError> {
    let many = args.scenarios.len() > 1;
    let mut loaded = Vec::with_capacity(args.scenarios.len());
    let mut dirs = std::collections::BTreeSet::new();
    for path in &args.scenarios {
        let at = path.display().to_string();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if many && !dirs.insert(name.clone()) {
            return Err(CliError::usage(format!(
                "{at}: a second scenario named {name:?}; each runs in OUT/<file stem>/, so the names must differ"
            )));
        }
        let (scenario, plan) = load(path, &args)?;
        print_timeline(&scenario, &plan);
        if args.check {
            println!("{at}: ok");
        }
        loaded.push((name, scenario, plan));
    }
    if args.check {
        return Ok(());
    }
    let out = args
        .out
        .ok_or_else(|| CliError::usage("--out DIR is needed to run a scenario (or --check)"))?;
    if out.join("report.json").exists()
        || out.join("run").exists()
        || out.join("comparison.md").exists()
    {
        return Err(CliError::usage(format!(
            "--out {} already holds a chaos run; choose another --out",
            out.display()
        )));
    }
    let mut results = Vec::with_capacity(loaded.len());
    for (name, scenario, plan) in &loaded {
        let dir = if many { out.join(name) } else { out.clone() };
        if many {
            println!("==== {name}");
        }
        let written = run_one(scenario, plan, &dir, args.baseline)?;
        results.push((name.as_str(), scenario, written));
    }
    if many {
        report::compare(&out, &results)?;
    }
    let missed: Vec<String> = results
        .iter()
        .flat_map(|(name, _, w)| {
            w.missed.iter().map(move |m| if many { format!("{name}: {m}") } else { m.clone() })
        })
        .collect();
    if missed.is_empty() {
        Ok(())
    } else {
        Err(CliError::failed(format!("expectations not met: {}", missed.join(", "))))
    }
}

/// Reads, checks and plans one scenario file.
fn load(path: &std::path::Path, args: &ChaosArgs) -> Result<(Scenario, runner::Plan), CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("cannot read scenario {}: {e}", path.display())))?;
    let at = path.display().to_string();
    let text = with_overrides(&text, &args.set, args.netns)
        .map_err(|m| CliError::usage(format!("{at}: {m}")))?;
    let mut options = None;
    let scenario = scenario::parse(&text, |table| {
        let o = cluster_options(table)?;
        let n = o.0.resolve().map_err(|e| format!("[cluster]: {e}"))?.nodes;
        options = Some(o);
        Ok(n)
    })
    .map_err(|m| CliError::usage(format!("{at}: {m}")))?;
    let plan = match (&scenario.attach, options) {
        (Some(_), _) if args.baseline => {
            return Err(CliError::usage(format!(
                "{at}: --baseline starts the same cluster without the events; an [attach] scenario has no cluster to start"
            )));
        }
        (Some(a), _) => runner::Plan::attached(&scenario, a),
        (None, Some((train, run))) => runner::Plan::new(&scenario, train, run),
        (None, None) => unreachable!("parse reads [cluster] when there is no [attach]"),
    }
    .map_err(|m| CliError::usage(format!("{at}: {m}")))?;
    Ok((scenario, plan))
}

/// Runs one scenario in `out` (and its baseline first, when asked) and
/// writes its report.
fn run_one(
    scenario: &Scenario,
    plan: &runner::Plan,
    out: &std::path::Path,
    with_baseline: bool,
) -> Result<report::Written, CliError> {
    std::fs::create_dir_all(out)
        .map_err(|e| CliError::failed(format!("cannot create {}: {e}", out.display())))?;
    let baseline = if with_baseline {
        println!("== baseline: the same cluster without the events");
        Some(runner::run(plan, &out.join("baseline"), false)?)
    } else {
        None
    };
    println!("== the scenario");
    let faulted = runner::run(plan, &out.join("run"), true)?;
    report::write(out, scenario, plan, &faulted, baseline.as_ref())
}

/// [cluster] as murmur cluster's --config would read it, with its defaults.
fn cluster_options(table: &toml::Table) -> Result<(TrainOptions, RunOptions), String> {
    let (mut train, run) =
        super::run::config_from_table(table.clone()).map_err(|m| format!("[cluster]: {m}"))?;
    super::cluster::as_cluster(&mut train);
    Ok((train, run))
}

fn print_timeline(s: &Scenario, plan: &runner::Plan) {
    if !s.description.is_empty() {
        println!("{}", s.description);
    }
    match &plan.attach {
        Some(apis) => println!(
            "{} running nodes, attached by their APIs ({}); {} events:",
            plan.nodes,
            apis.join(", "),
            s.events.len()
        ),
        None => {
            let place = if plan.netns { ", one network namespace each" } else { "" };
            println!(
                "{} nodes{place}, {} rounds, {} topology; {} events:",
                plan.nodes,
                plan.rounds,
                plan.topology,
                s.events.len()
            );
        }
    }
    if let Some(r) = &s.relays {
        println!("  relays (no data, no local steps): {r}");
    }
    for (i, e) in s.events.iter().enumerate() {
        println!("  {:>2}. at {:<10} {}", i + 1, e.when.to_string(), e.label);
    }
}
