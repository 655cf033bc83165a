//! The chaos report: report.json (everything recorded), report.md (the
//! timeline, each node's end, the result against the baseline, the
//! expectations) and chaos.svg (accuracy, consensus distance, bytes and live
//! members per node over rounds, the fault windows shaded; with a baseline,
//! the mean accuracy of both runs side by side).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use super::runner::{Applied, NodeEnd, Plan, RunRecord};
use super::scenario::Scenario;
use crate::cli::CliError;
use crate::cli::cluster;
use crate::cli::plot::{Band, Series, svg_banded};
use crate::train::load;
use crate::train::trainer::Trainer;

/// What a run ended with.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The held-out accuracy (or loss) of the average of the finished
    /// nodes' final models.
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    /// Of the finished nodes' final models.
    pub consensus: Option<f64>,
    /// The held-out accuracy of each finished node's own model: the mean
    /// and the worst. Where the network fell apart these fall while the
    /// average of the models (which no node holds) may not.
    pub node_mean: Option<f64>,
    pub node_worst: Option<f64>,
    pub finished: usize,
    pub wall: f64,
}

fn outcome(plan: &Plan, split: Option<&crate::train::dataset::Split>, rec: &RunRecord) -> Outcome {
    let models: Vec<Vec<f32>> = rec
        .nodes
        .iter()
        .filter(|n| n.state == "finished")
        .filter_map(|n| {
            cluster::read_model(
                &rec.dir.join(format!("node-{}/checkpoint/model.safetensors", n.index)),
            )
        })
        .collect();
    let metrics = cluster::mean_model(&models).and_then(|avg| {
        let mut cfg = plan.train_cfg.clone();
        cfg.threads = 1;
        let mut t = Trainer::new(cfg, split?).ok()?;
        t.set_flat(&avg).ok()?;
        Some(t.evaluate())
    });
    let own: Vec<f64> =
        rec.nodes.iter().filter(|n| n.state == "finished").filter_map(|n| n.accuracy).collect();
    Outcome {
        accuracy: metrics.as_ref().and_then(|m| m.accuracy),
        loss: metrics.as_ref().map(|m| m.loss),
        consensus: cluster::consensus_distance(&models),
        node_mean: (!own.is_empty()).then(|| own.iter().sum::<f64>() / own.len() as f64),
        node_worst: own.iter().copied().reduce(f64::min),
        finished: rec.nodes.iter().filter(|n| n.state == "finished").count(),
        wall: rec.wall,
    }
}

/// The fault windows: from a kill or stop to the restart of any of its
/// nodes, from a fault to its clear, from a partition to the heal, from a
/// cut to the restore, from a link change to the next change of any of
/// its links (or to the run's last round).
pub fn windows(applied: &[Applied], last_round: u64) -> Vec<Band> {
    let ends = |k: usize, closer: &str| -> u64 {
        let a = &applied[k];
        applied[k + 1..]
            .iter()
            .find(|b| {
                b.action == closer
                    && (closer == "heal" || b.nodes.iter().any(|n| a.nodes.contains(n)))
                    && !b.nodes.is_empty()
            })
            .map_or(last_round, |b| b.round)
    };
    applied
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.nodes.is_empty())
        .filter_map(|(k, a)| {
            let closer = match a.action.as_str() {
                "kill" | "stop" => "restart",
                "fault" => "clear",
                "partition" => "heal",
                "cut" => "restore",
                "link" => "link",
                _ => return None,
            };
            let to = ends(k, closer).max(a.round);
            Some(Band { from: a.round as f64, to: to as f64, label: a.label.clone() })
        })
        .collect()
}

/// Each expectation, whether it held (`None`: it could not be checked in
/// this run), and what was measured.
fn check(
    s: &Scenario,
    rec: &RunRecord,
    run: &Outcome,
    base: Option<&Outcome>,
) -> Vec<(String, Option<bool>, String)> {
    let mut out = Vec::new();
    let e = &s.expect;
    if e.survivors_finish {
        let failed: Vec<usize> = rec
            .nodes
            .iter()
            .filter(|n| n.state == "failed" || n.state == "unreachable")
            .map(|n| n.index)
            .collect();
        out.push((
            "survivors finish".into(),
            Some(failed.is_empty()),
            if failed.is_empty() {
                format!("{} nodes finished", run.finished)
            } else {
                format!("nodes {failed:?} failed or fell silent (see their logs)")
            },
        ));
    }
    if let Some(min) = e.min_accuracy {
        out.push((
            format!("accuracy at least {:.2}%", min * 100.0),
            Some(run.accuracy.is_some_and(|a| a >= min)),
            format!("average of the final models: {}", pct(run.accuracy)),
        ));
    }
    if let Some(max) = e.max_drop {
        let name = format!("at most {:.2} points below the baseline", max * 100.0);
        match base {
            Some(b) => out.push((
                name,
                Some(matches!((run.accuracy, b.accuracy), (Some(r), Some(b)) if r >= b - max)),
                format!("{} against {}", pct(run.accuracy), pct(b.accuracy)),
            )),
            None => out.push((name, None, "not checked: run with --baseline".into())),
        }
    }
    out
}

/// An accuracy as a percentage, "-" when there is none.
fn pct(a: Option<f64>) -> String {
    a.map_or("-".into(), |a| format!("{:.2}%", a * 100.0))
}

/// A run's outcome as report.json and comparison.json give it.
fn outcome_json(o: &Outcome) -> serde_json::Value {
    json!({
        "eval_accuracy": o.accuracy, "eval_loss": o.loss, "consensus_distance": o.consensus,
        "node_mean_accuracy": o.node_mean, "node_worst_accuracy": o.node_worst,
        "finished": o.finished, "wall_seconds": o.wall,
    })
}

/// What a written report found.
#[derive(Debug, Clone)]
pub struct Written {
    pub run: Outcome,
    pub base: Option<Outcome>,
    /// The expectations not met.
    pub missed: Vec<String>,
}

pub fn write(
    out: &Path,
    s: &Scenario,
    plan: &Plan,
    rec: &RunRecord,
    baseline: Option<&RunRecord>,
) -> Result<Written, CliError> {
    // The held-out data, read once for both runs.
    // (Attached nodes' models are not here to evaluate.)
    let split = match plan.attach {
        Some(_) => None,
        None => load::load(&plan.train_cfg.data_spec(), plan.train_cfg.holdout).ok(),
    };
    let run = outcome(plan, split.as_ref(), rec);
    let base = baseline.map(|b| outcome(plan, split.as_ref(), b));
    let bands = windows(&rec.applied, rec.last_round);
    let checks = check(s, rec, &run, base.as_ref());
    let doc = json!({
        "description": s.description,
        "nodes": plan.nodes,
        "rounds": plan.rounds,
        "topology": plan.topology.to_string(),
        "events": rec.applied,
        "windows": bands.iter().map(|b| json!({"from_round": b.from, "to_round": b.to, "label": b.label})).collect::<Vec<_>>(),
        "node_ends": rec.nodes,
        "result": outcome_json(&run),
        "baseline": base.as_ref().map(outcome_json),
        "expectations": checks.iter().map(|(n, ok, d)| json!({"name": n, "held": ok, "measured": d})).collect::<Vec<_>>(),
        "samples": rec.samples,
        "baseline_samples": baseline.map(|b| &b.samples),
    });
    let put = |name: &str, bytes: &[u8]| {
        let path = out.join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))
    };
    put("report.json", &serde_json::to_vec_pretty(&doc).map_err(CliError::failed)?)?;
    put("chaos.svg", charts(rec, baseline, &bands).as_bytes())?;
    let md =
        markdown(s, plan, rec, &run, base.as_ref(), baseline.map(|b| b.nodes.as_slice()), &checks);
    put("report.md", md.as_bytes())?;
    println!("{md}");
    println!("wrote {}/report.md, report.json and chaos.svg", out.display());
    let missed = checks.iter().filter(|c| c.1 == Some(false)).map(|c| c.0.clone()).collect();
    Ok(Written { run, base, missed })
}

/// Several scenarios side by side: comparison.md and comparison.json in
/// `out`, one row per scenario (each one's own report is in its folder).
pub fn compare(out: &Path, results: &[(&str, &Scenario, Written)]) -> Result<(), CliError> {
    let mut m = String::from("# Chaos comparison\n\n");
    for (name, s, _) in results {
        let _ = writeln!(m, "- **{name}**: {}", s.description);
    }
    m.push_str(
        "\nHeld-out accuracy of the average of the finished nodes' final models, of each finished node's own model (mean and worst), and the final models' consensus distance; each scenario's report.md is in its folder.\n\n| scenario | average model | nodes: mean | nodes: worst | consensus distance | finished | baseline: average model | expectations |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (name, _, w) in results {
        let r = &w.run;
        let verdict = if w.missed.is_empty() { "held".into() } else { w.missed.join("; ") };
        let _ = writeln!(
            m,
            "| {name} | {} | {} | {} | {} | {} | {} | {verdict} |",
            pct(r.accuracy),
            pct(r.node_mean),
            pct(r.node_worst),
            r.consensus.map_or("-".into(), |c| format!("{c:.4}")),
            r.finished,
            pct(w.base.as_ref().and_then(|b| b.accuracy)),
        );
    }
    let doc: Vec<_> = results
        .iter()
        .map(|(name, s, w)| {
            json!({
                "scenario": name, "description": s.description, "result": outcome_json(&w.run),
                "baseline": w.base.as_ref().map(outcome_json), "missed": w.missed,
            })
        })
        .collect();
    for (file, bytes) in [
        ("comparison.json", serde_json::to_vec_pretty(&doc).map_err(CliError::failed)?),
        ("comparison.md", m.clone().into_bytes()),
    ] {
        let path = out.join(file);
        std::fs::write(&path, bytes)
            .map_err(|e| CliError::failed(format!("cannot write {}: {e}", path.display())))?;
    }
    println!("{m}");
    println!("wrote {}/comparison.md and comparison.json", out.display());
    Ok(())
}

fn per_node(
    rec: &RunRecord,
    point: impl Fn(&super::runner::Sample) -> Option<(f64, f64)>,
) -> Vec<Series> {
    let mut by: BTreeMap<usize, Vec<(f64, f64)>> = BTreeMap::new();
    for s in &rec.samples {
        if let Some(p) = point(s) {
            let v = by.entry(s.node).or_default();
            if v.last() != Some(&p) {
                v.push(p);
            }
        }
    }
    by.into_iter().map(|(i, points)| Series { name: format!("node {i}"), points }).collect()
}

/// The mean over nodes of each node's latest accuracy, by evaluated round.
fn mean_accuracy(rec: &RunRecord, name: &str) -> Series {
    let mut at: BTreeMap<u64, BTreeMap<usize, f64>> = BTreeMap::new();
    for s in &rec.samples {
        if let (Some(r), Some(a)) = (s.eval_round, s.accuracy.or(s.eval_loss)) {
            at.entry(r).or_default().insert(s.node, a);
        }
    }
    let points =
        at.into_iter().map(|(r, m)| (r as f64, m.values().sum::<f64>() / m.len() as f64)).collect();
    Series { name: name.into(), points }
}

fn charts(rec: &RunRecord, baseline: Option<&RunRecord>, bands: &[Band]) -> String {
    let mut panels = vec![
        (
            "held-out accuracy (loss for text)".to_string(),
            "round".to_string(),
            "accuracy".to_string(),
            per_node(rec, |s| Some((s.eval_round? as f64, s.accuracy.or(s.eval_loss)?))),
        ),
        (
            "distance to the neighbours mixed".into(),
            "round".into(),
            "consensus distance".into(),
            per_node(rec, |s| Some((s.round as f64, s.consensus?))),
        ),
        (
            "bytes sent".into(),
            "round".into(),
            "MB".into(),
            per_node(rec, |s| Some((s.round as f64, s.bytes_sent as f64 / 1e6))),
        ),
        (
            "live members seen".into(),
            "round".into(),
            "members".into(),
            per_node(rec, |s| Some((s.round as f64, f64::from(s.live_members)))),
        ),
    ];
    if let Some(b) = baseline {
        panels.push((
            "mean accuracy: scenario vs baseline".into(),
            "round".into(),
            "accuracy".into(),
            vec![mean_accuracy(rec, "scenario"), mean_accuracy(b, "baseline")],
        ));
    }
    svg_banded(&panels, bands)
}

fn markdown(
    s: &Scenario,
    plan: &Plan,
    rec: &RunRecord,
    run: &Outcome,
    base: Option<&Outcome>,
    baseline_nodes: Option<&[NodeEnd]>,
    checks: &[(String, Option<bool>, String)],
) -> String {
    let mut m = String::from("# Chaos report\n\n");
    if !s.description.is_empty() {
        let _ = writeln!(m, "{}\n", s.description);
    }
    let _ = match &plan.attach {
        Some(apis) => writeln!(
            m,
            "{} running nodes, attached by their APIs ({}); the final models are theirs to read, so the results below are the nodes' own. Fault windows are shaded in chaos.svg.\n",
            plan.nodes,
            apis.join(", ")
        ),
        None => writeln!(
            m,
            "{} nodes, {} rounds, {} topology. Fault windows are shaded in chaos.svg.\n",
            plan.nodes, plan.rounds, plan.topology
        ),
    };
    m.push_str("## Events\n\n| # | planned | took effect | event | nodes (their rounds) | outcome |\n|---|---|---|---|---|---|\n");
    for a in &rec.applied {
        let nodes: Vec<String> = a.node_rounds.iter().map(|(i, r)| format!("{i} ({r})")).collect();
        let _ = writeln!(
            m,
            "| {} | {} | round {}, {:.1} s | {} | {} | {} |",
            a.event,
            a.planned,
            a.round,
            a.secs,
            a.label,
            nodes.join(", "),
            a.outcome
        );
    }
    m.push_str("\n## Nodes\n\n| node | ended | starts | rounds | exit |\n|---|---|---|---|---|\n");
    for n in &rec.nodes {
        let exit = n.exit_status.map_or("signal".into(), |c| c.to_string());
        let relay = if n.relay { " (relay: no data)" } else { "" };
        let _ = writeln!(
            m,
            "| {}{relay} | {} | {} | {} | {} |",
            n.index, n.state, n.starts, n.round, exit
        );
    }
    if rec.nodes.iter().any(|n| n.ip.is_some()) {
        m.push_str(&links(rec, baseline_nodes));
    }
    let num = |a: Option<f64>| a.map_or("-".into(), |a| format!("{a:.4}"));
    let b = |f: &dyn Fn(&Outcome) -> String| base.map_or("-".into(), f);
    m.push_str("\n## Result\n\n| | scenario | baseline (no events) |\n|---|---|---|\n");
    let rows: [(&str, String, String); 7] = [
        (
            "held-out accuracy, average of the final models",
            pct(run.accuracy),
            b(&|o| pct(o.accuracy)),
        ),
        (
            "held-out accuracy of each node's own model: mean",
            pct(run.node_mean),
            b(&|o| pct(o.node_mean)),
        ),
        ("the same: worst node", pct(run.node_worst), b(&|o| pct(o.node_worst))),
        ("held-out loss, same model", num(run.loss), b(&|o| num(o.loss))),
        ("consensus distance of the final models", num(run.consensus), b(&|o| num(o.consensus))),
        ("nodes finished", run.finished.to_string(), b(&|o| o.finished.to_string())),
        ("wall seconds", format!("{:.1}", run.wall), b(&|o| format!("{:.1}", o.wall))),
    ];
    for (name, r, bl) in rows {
        let _ = writeln!(m, "| {name} | {r} | {bl} |");
    }
    if !checks.is_empty() {
        m.push_str("\n## Expectations\n\n");
        for (name, ok, measured) in checks {
            let verdict = match ok {
                Some(true) => "held",
                Some(false) => "NOT MET",
                None => "not checked",
            };
            let _ = writeln!(m, "- {verdict}: {name} ({measured})");
        }
    }
    m.push_str("\n![chaos](chaos.svg)\n");
    m
}

/// netns: each node's address, what nftables dropped on its ingress, and
/// what its exchanges cost (seconds between local phases per round, bytes),
/// against the same node in the baseline.
fn links(rec: &RunRecord, baseline: Option<&[NodeEnd]>) -> String {
    let mut m = String::from(
        "\n## Links (netns)\n\n| node | address | dropped: loss | dropped: partition | communication s/round | baseline s/round | MB sent | MB received |\n|---|---|---|---|---|---|---|---|\n",
    );
    let per_round =
        |n: &NodeEnd| n.communication_seconds.filter(|_| n.round > 0).map(|s| s / n.round as f64);
    let fmt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
    let mb = |b: Option<u64>| fmt(b.map(|b| b as f64 / 1e6), 2);
    for n in &rec.nodes {
        let drops = n.drops.unwrap_or_default();
        let base = baseline.and_then(|b| b.get(n.index)).and_then(per_round);
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            n.index,
            n.ip.as_deref().unwrap_or("-"),
            drops.loss_packets,
            drops.partition_packets,
            fmt(per_round(n), 3),
            fmt(base, 3),
            mb(n.bytes_sent),
            mb(n.bytes_received),
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(action: &str, round: u64, nodes: &[usize]) -> Applied {
        Applied {
            event: 0,
            label: action.into(),
            action: action.into(),
            planned: String::new(),
            round,
            secs: 0.0,
            nodes: nodes.to_vec(),
            node_rounds: Vec::new(),
            outcome: "ok".into(),
        }
    }

    #[test]
    fn windows_run_from_a_fault_to_what_ends_it() {
        let log = [
            applied("kill", 5, &[1, 2]),
            applied("fault", 6, &[0]),
            applied("partition", 7, &[0, 1, 2, 3]),
            applied("restart", 9, &[2]),
            applied("heal", 12, &[0, 1, 2, 3]),
            applied("stop", 13, &[]),
            applied("link", 14, &[0, 1]),
            applied("cut", 15, &[3]),
            applied("link", 16, &[1]),
            applied("restore", 18, &[3]),
        ];
        let w: Vec<(f64, f64)> = windows(&log, 20).iter().map(|b| (b.from, b.to)).collect();
        // The kill ends with the restart of one of its nodes; the fault is
        // never cleared; an event that acted on no node draws nothing.
        // A link change lasts until the next one on any of its nodes.
        assert_eq!(
            w,
            [(5.0, 9.0), (6.0, 20.0), (7.0, 12.0), (14.0, 16.0), (15.0, 18.0), (16.0, 20.0)]
        );
    }
}
