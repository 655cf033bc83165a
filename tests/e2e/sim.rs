//! `murmur sim`: many strategies in one process over a lossy simulated
//! network; what it reports in `sim.json`, and its refusal of bad input.

use crate::harness::{murmur, ok, read_json, s};

#[test]
fn gossip_on_an_exponential_graph_agrees_through_20_percent_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sim");
    let args = ["sim", "--nodes", "32", "--topology", "exponential", "--loss", "0.2"];
    let stdout = ok(&murmur(&[&args[..], &["--rounds", "30", "--out", s(&out)]].concat()));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("round ")).count(), 30, "{stdout}");
    let report = read_json(&out.join("sim.json"));
    assert_eq!(report["end"], "all_finished");
    assert_eq!(report["settings"]["nodes"], 32);
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 30);
    let initial = report["initial_consensus_distance"].as_f64().unwrap();
    let last = rounds[29]["consensus_distance"].as_f64().unwrap();
    // The 32-node exponential graph's second eigenvalue is 0.6, so lossless
    // gossip gains 0.6^30 = 2e-7 in 30 rounds; measured 8.6e-8 with loss.
    assert!(initial > 1.0 && last < initial * 1e-4, "{initial} -> {last}");
    let m = &report["messages"];
    let (sent, dropped) = (m["sent"].as_f64().unwrap(), m["dropped"].as_f64().unwrap());
    assert!((0.15..0.25).contains(&(dropped / sent)), "lost {dropped} of {sent}");
}

#[test]
fn a_bad_loss_is_refused_with_exit_2() {
    let out = murmur(&["sim", "--loss", "1.5"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim(), "error: --loss must be in [0, 1] (got 1.5)");
    assert!(out.stdout.is_empty());
}
