//! `murmur chaos`: the shipped scenarios (deploy/scenarios/), each run for
//! real at its small size, asserting the outcome it promises; and the
//! checks that refuse a bad scenario before anything starts.

use std::path::{Path, PathBuf};

use crate::harness::{data_dir, missing, murmur, ok, read_json, s};
use crate::swarm::LiveNode;

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/scenarios").join(name)
}

/// Runs a shipped scenario into `out` and returns report.json.
fn chaos(name: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let path = scenario(name);
    let mut args = vec!["chaos", s(&path), "--out", s(out)];
    args.extend_from_slice(extra);
    let stdout = ok(&murmur(&args));
    assert!(stdout.contains("# Chaos report"), "{stdout}");
    let report = read_json(&out.join("report.json"));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("## Events") && md.contains("![chaos](chaos.svg)"));
    report
}

fn ends(report: &serde_json::Value, state: &str) -> Vec<u64> {
    let ends = report["node_ends"].as_array().unwrap();
    ends.iter().filter(|n| n["state"] == state).map(|n| n["index"].as_u64().unwrap()).collect()
}

/// Every expectation was checked and held.
fn held(report: &serde_json::Value) {
    for e in report["expectations"].as_array().unwrap() {
        assert_eq!(e["held"], true, "{e}");
    }
}

/// The round each event took effect at, against the round it was planned for.
fn took_effect(report: &serde_json::Value) -> Vec<(u64, String)> {
    let events = report["events"].as_array().unwrap();
    events.iter().map(|e| (e["round"].as_u64().unwrap(), e["outcome"].to_string())).collect()
}

#[test]
fn every_shipped_scenario_checks_and_bad_ones_name_the_bad_value() {
    let dir = scenario("");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = ok(&murmur(&["chaos", "--check", s(&path)]));
            assert!(out.contains(": ok"), "{out}");
            n += 1;
        }
    }
    assert!(n >= 7, "{n} scenarios in {}", dir.display());
    let tmp = tempfile::tempdir().unwrap();
    let bad = [
        (
            "[cluster]\nnodes = 4\n[[event]]\nround = 3\naction = \"kill\"\nnodes = [4]",
            "node 4 is not one of 0..4",
        ),
        (
            "[cluster]\nnodes = 4\n[[event]]\nround = 3\naction = \"fault\"\nnodes = [1]\nfault = \"drop:7\"",
            "fault \"drop:7\"",
        ),
        ("[cluster]\nnodes = 4\nlocal-steps = -2", "[cluster]"),
        (
            "[cluster]\nnodes = 4\n[[event]]\nround = 3\naction = \"cut\"\nnodes = [1]",
            "set netns = true",
        ),
        (
            "[cluster]\nnodes = 4\n[[event]]\nround = 3\naction = \"join\"\nnodes = \"all\"",
            "join needs a list of node indices",
        ),
        (
            "netns = true\n[cluster]\nnodes = 4\n[[event]]\nround = 3\naction = \"link\"\nnodes = [1]\nrate = \"fast\"",
            "\"fast\"",
        ),
        (
            "[cluster]\nnodes = 4\n[[event]]\nround = 3\naction = \"kill\"\nnodes = [1]\nextra = 1",
            "unknown field `extra`",
        ),
        ("relays = \"hubs:4\"\n[cluster]\nnodes = 4", "makes all 4 nodes relays"),
        (
            "relays = \"hubs:1\"\n[cluster]\nnodes = 4\nstrategy = \"merge\"",
            "--relays take part in gossip only (the strategy is merge)",
        ),
        ("relays = [1]\n[cluster]\nnodes = 4\nrelays = [2]", "given at the top and in [cluster]"),
    ];
    for (text, want) in bad {
        let path = tmp.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = murmur(&["chaos", "--check", s(&path)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(want), "{text}: {err:?} does not name {want:?}");
    }
    // A --set override is checked like the file.
    let out = murmur(&["chaos", "--check", s(&scenario("kill-half.toml")), "--set", "nodes=2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("K must be within 1..=2 (got \"3\")"), "{err}");
}

#[test]
fn half_the_nodes_killed_the_others_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let r = chaos("kill-half.toml", tmp.path(), &[]);
    assert_eq!(ends(&r, "killed").len(), 3, "{}", r["node_ends"]);
    assert_eq!(ends(&r, "finished").len(), 3, "{}", r["node_ends"]);
    let (round, outcome) = &took_effect(&r)[0];
    assert!((10..=12).contains(round), "the kill took effect at round {round}");
    assert_eq!(outcome, "\"ok\"");
    held(&r);
    // The window is drawn from the kill to the end.
    let svg = std::fs::read_to_string(tmp.path().join("chaos.svg")).unwrap();
    assert!(svg.contains("<rect") && svg.contains("kill random:3"));
    // The survivors felt it: they went without the dead nodes' messages,
    // or saw them leave.
    let felt = ends(&r, "finished").into_iter().any(|i| {
        let summary = read_json(&tmp.path().join(format!("run/node-{i}/summary.json")));
        let fewer = r["samples"].as_array().unwrap().iter().any(|x| {
            x["node"] == i && x["live_members"].as_u64() < Some(6) && x["round"].as_u64() > Some(12)
        });
        missing(&summary["strategy_drops"]) > 0 || fewer
    });
    assert!(felt, "no survivor missed a message or a member");
}

#[test]
fn four_of_five_killed_the_last_one_finishes_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let r = chaos("kill-80.toml", tmp.path(), &[]);
    assert_eq!(ends(&r, "killed").len(), 4, "{}", r["node_ends"]);
    assert_eq!(ends(&r, "finished").len(), 1, "{}", r["node_ends"]);
    held(&r);
}

#[test]
fn a_partition_into_halves_heals_to_the_baseline() {
    let _machine = crate::harness::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let r = chaos("partition-heal.toml", tmp.path(), &["--baseline"]);
    assert_eq!(ends(&r, "finished").len(), 6);
    held(&r);
    let events = took_effect(&r);
    assert!((6..=7).contains(&events[0].0) && (16..=17).contains(&events[1].0), "{events:?}");
    // The cut was real: each node refused its other half's traffic.
    for i in 0..6 {
        let summary = read_json(&tmp.path().join(format!("run/node-{i}/summary.json")));
        let cut = summary["fault_effects"]["partitioned"].as_u64().unwrap_or(0);
        assert!(cut > 0, "node {i}: {}", summary["fault_effects"]);
        let base = read_json(&tmp.path().join(format!("baseline/node-{i}/summary.json")));
        assert!(base["fault_effects"]["partitioned"].is_null(), "{}", base["fault_effects"]);
    }
    assert!(r["baseline"]["eval_accuracy"].as_f64().unwrap() > 0.7, "{}", r["baseline"]);
}

#[test]
fn churn_every_node_comes_back_and_finishes() {
    let _machine = crate::harness::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let r = chaos("churn.toml", tmp.path(), &[]);
    assert_eq!(ends(&r, "finished").len(), 7, "{}", r["node_ends"]);
    let starts: Vec<u64> =
        r["node_ends"].as_array().unwrap().iter().map(|n| n["starts"].as_u64().unwrap()).collect();
    assert_eq!(starts, [1, 2, 2, 2, 2, 1, 1]);
    for (round, outcome) in took_effect(&r) {
        assert_eq!(outcome, "\"ok\"", "at round {round}");
    }
    held(&r);
    // A restarted node resumed: its summary counts its rounds from the run's
    // start, not from its restart.
    let summary = read_json(&tmp.path().join("run/node-2/summary.json"));
    assert_eq!(summary["rounds"], 80, "{}", summary["rounds"]);
    // Every node that came back asked the run's members for their state
    // and took it only checked: the coordinate-wise median of three or more
    // answers, or two that agree. Under churn this fast a member asked may
    // stop before it answers, leaving two that disagree (honest ring
    // members lie far apart); the node then continues from its checkpoint
    // and says why. The newcomer joins when the restarted nodes are back,
    // and takes a median.
    let pull = |i: usize| {
        let s = read_json(&tmp.path().join(format!("run/node-{i}/summary.json")));
        let said =
            ["pulled_from", "pulled_round", "pull_witnessed", "pulled_median_of", "pull_disagreed"]
                .map(|k| format!("{k} {}", s[k]))
                .join(", ");
        (s, said)
    };
    for i in [1, 2, 3, 4] {
        let (s, said) = pull(i);
        match s["pulled_from"].is_string() {
            true => assert_eq!(s["pull_witnessed"], true, "node {i}: {said}"),
            false => assert!(s["pull_disagreed"].is_string(), "node {i}: {said}"),
        }
    }
    let (s, said) = pull(6);
    assert!(s["pulled_median_of"].as_u64() >= Some(3), "node 6: {said}");
    // The newcomer entered the run under way, not at round 0 on a model of
    // its own, and ended with the others.
    let joined = read_json(&tmp.path().join("run/node-6/summary.json"));
    // At the median round of the members it asked (some restarted ones
    // behind the furthest node, whose round 45 fired the join).
    let entered = joined["pulled_round"].as_u64().unwrap();
    assert!((25..80).contains(&entered), "entered at round {entered}");
    assert_eq!(joined["rounds"], 80);
    assert!(joined["resumed_from_round"].is_null(), "{}", joined["resumed_from_round"]);
    // Its own model is as good as the others': at least the worst of the
    // nodes that started the run, less 5 points (their spread is ~10).
    let acc = |s: &serde_json::Value| s["final"]["eval_accuracy"].as_f64().unwrap();
    let worst = (0..6)
        .map(|i| acc(&read_json(&tmp.path().join(format!("run/node-{i}/summary.json")))))
        .fold(f64::INFINITY, f64::min);
    assert!(acc(&joined) > worst - 0.05, "{} against the worst other node's {worst}", acc(&joined));
}

/// The disaster study's three arms in one invocation: a Barabási–Albert
/// tree with label-skewed data loses its two hubs, two leaves, or its two
/// hubs when they hold no data. Losing the hubs splits the tree: the
/// survivors' models drift apart and their average is worse than after
/// losing two leaves (which cost as much data and no connectivity).
#[test]
fn the_disaster_study_losing_hubs_hurts_more_than_losing_leaves() {
    let _machine = crate::harness::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let arms = ["disaster-hubs.toml", "disaster-leaves.toml", "disaster-relays.toml"];
    let paths: Vec<PathBuf> = arms.iter().map(|a| scenario(a)).collect();
    let mut args = vec!["chaos"];
    args.extend(paths.iter().map(|p| s(p)));
    args.extend(["--out", s(tmp.path())]);
    let stdout = ok(&murmur(&args));
    assert!(stdout.contains("# Chaos comparison"), "{stdout}");
    let md = std::fs::read_to_string(tmp.path().join("comparison.md")).unwrap();
    let rows = read_json(&tmp.path().join("comparison.json"));
    let arm = |name: &str| {
        let r = rows.as_array().unwrap().iter().find(|r| r["scenario"] == name).unwrap();
        let report = read_json(&tmp.path().join(name).join("report.json"));
        held(&report);
        assert_eq!(ends(&report, "finished").len(), 8, "{name}: {}", report["node_ends"]);
        (r["result"].clone(), report)
    };
    let (hubs, _) = arm("disaster-hubs");
    let (leaves, _) = arm("disaster-leaves");
    let (relays, relay_report) = arm("disaster-relays");
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    eprintln!("disaster study (average model accuracy, consensus distance):\n{md}");
    assert!(
        f(&hubs, "eval_accuracy") < f(&leaves, "eval_accuracy"),
        "losing hubs should hurt more than losing leaves:\n{md}"
    );
    assert!(f(&hubs, "consensus_distance") > f(&leaves, "consensus_distance"), "{md}");
    // The relays were the hubs, they held no data, and losing them still
    // split the network (the drift is the connectivity's, not the data's).
    assert!(f(&relays, "consensus_distance") > f(&leaves, "consensus_distance"), "{md}");
    let nodes = relay_report["node_ends"].as_array().unwrap();
    let relay: Vec<u64> =
        nodes.iter().filter(|n| n["relay"] == true).map(|n| n["index"].as_u64().unwrap()).collect();
    assert_eq!(relay, ends(&relay_report, "killed"), "the killed hubs are the relays");
    // They mixed before they died: their neighbours received from them (a
    // status sample of the relay itself may all come before its first
    // send, the kill being at round 5 of fast rounds).
    let run = tmp.path().join("disaster-relays/run");
    let received_from = |peer: &serde_json::Value| -> u64 {
        ends(&relay_report, "finished")
            .iter()
            .map(|j| read_json(&run.join(format!("node-{j}/summary.json"))))
            .filter_map(|s| s["traffic_by_peer"][peer.as_str()?]["bytes_received"].as_u64())
            .sum()
    };
    for i in relay {
        let peer = &nodes.iter().find(|n| n["index"] == i).unwrap()["peer_id"];
        assert!(received_from(peer) > 0, "nobody received from relay {i} ({peer})");
    }
}

/// A scenario against nodes `murmur chaos` did not start: three `murmur
/// run` processes, reached through their APIs only (`[attach]`): a fault
/// on one and its clear, a partition and its heal, and a stop (the API's
/// Shutdown) of another.
#[test]
fn a_scenario_acts_on_running_nodes_through_their_apis() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--data",
        "synthetic",
        "--hidden",
        "32",
        "--rounds",
        "150",
        "--local-steps",
        "50",
        "--round-timeout-ms",
        "1000",
    ];
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.path().join(format!("node-{i}"))).collect();
    let boot = LiveNode::start(&dirs[0], 0, 3, None, &args);
    let addr = boot.p2p.clone();
    let mut nodes = vec![boot];
    for (i, dir) in dirs.iter().enumerate().skip(1) {
        nodes.push(LiveNode::start(dir, i, 3, Some(&addr), &args));
    }
    let apis: Vec<String> = nodes.iter().map(|n| format!("{:?}", n.api)).collect();
    let text = format!(
        "description = \"three nodes started elsewhere\"\n[attach]\napis = [{}]\n\
         [[event]]\nround = 10\naction = \"fault\"\nnodes = [1]\nfault = \"drop:1.0:in\"\n\
         [[event]]\nround = 50\naction = \"clear\"\nnodes = [1]\n\
         [[event]]\nround = 60\naction = \"partition\"\ngroups = [[0], [1, 2]]\n\
         [[event]]\nround = 90\naction = \"heal\"\n\
         [[event]]\nround = 110\naction = \"stop\"\nnodes = [2]\n",
        apis.join(", ")
    );
    let path = tmp.path().join("attached.toml");
    std::fs::write(&path, text).unwrap();
    let out = tmp.path().join("out");
    // Nothing an attached scenario cannot do gets as far as the nodes.
    let refused = murmur(&["chaos", s(&path), "--baseline", "--out", s(&out)]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no cluster to start"));
    let stdout = ok(&murmur(&["chaos", s(&path), "--out", s(&out)]));
    assert!(stdout.contains("3 running nodes, attached by their APIs"), "{stdout}");
    let r = read_json(&out.join("report.json"));
    for (round, outcome) in took_effect(&r) {
        assert_eq!(outcome, "\"ok\"", "at round {round}: {}", r["events"]);
    }
    assert_eq!(ends(&r, "finished"), [0, 1], "{}", r["node_ends"]);
    assert_eq!(ends(&r, "stopped"), [2], "{}", r["node_ends"]);
    held(&r);
    for (i, n) in nodes.iter_mut().enumerate() {
        assert_eq!(n.wait_exit(std::time::Duration::from_secs(60)), 0, "node {i}");
    }
    let effects = |i: usize| read_json(&dirs[i].join("summary.json"))["fault_effects"].clone();
    assert!(effects(1)["dropped_in"].as_u64() > Some(0), "node 1: {}", effects(1));
    assert!(effects(0)["partitioned"].as_u64() > Some(0), "node 0: {}", effects(0));
    assert!(effects(0)["dropped_in"].is_null(), "node 0 had no drop fault: {}", effects(0));
    let stopped = read_json(&dirs[2].join("summary.json"));
    assert_eq!(stopped["interrupted"], true);
    let rounds = stopped["rounds"].as_u64().unwrap();
    // The stop fires when the furthest node has done 110 rounds; node 2,
    // on the slower side of the partition, may be well behind it.
    assert!((40..150).contains(&rounds), "node 2 stopped at round {rounds}");
    // The report says how each node's own model did.
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("each node's own model: mean"), "{md}");
}

/// Two of eight nodes sign-flip what they send, on MNIST (the scenarios'
/// data path replaced by the test data's).
#[test]
fn a_robust_aggregator_holds_against_two_sign_flippers_where_the_mean_does_not() {
    let _machine = crate::harness::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let data = format!("data=mnist:{}", s(&data_dir().join("mnist")));
    let set = ["--set", data.as_str()];
    let trimmed = chaos(
        "byzantine-trimmed.toml",
        &tmp.path().join("trimmed"),
        &[&set[..], &["--baseline"]].concat(),
    );
    held(&trimmed);
    let median = chaos(
        "byzantine-trimmed.toml",
        &tmp.path().join("median"),
        &[&set[..], &["--set", "aggregator=median"]].concat(),
    );
    // Without --baseline the margin to it is reported as not checked.
    assert!(median["expectations"].as_array().unwrap().iter().any(|e| e["held"].is_null()));
    let mean = chaos("byzantine-mean.toml", &tmp.path().join("mean"), &set);
    let acc = |r: &serde_json::Value| r["result"]["eval_accuracy"].as_f64().unwrap();
    let clean = trimmed["baseline"]["eval_accuracy"].as_f64().unwrap();
    eprintln!(
        "MNIST, 8 nodes, complete graph, nodes 6 and 7 sign-flipping: fault-free (trimmed mean) {clean:.4}; \
         mean {:.4}; trimmed-mean:0.25 {:.4}; median {:.4}",
        acc(&mean),
        acc(&trimmed),
        acc(&median)
    );
    assert!(clean >= 0.95, "fault-free {clean}");
    assert!(acc(&median) >= clean - 0.03, "median {} vs fault-free {clean}", acc(&median));
    assert!(acc(&mean) < clean - 0.20, "the plain mean should break: {} vs {clean}", acc(&mean));
}

/// Each node's round, second by second, from a report's status samples.
fn rounds_by_second(report: &serde_json::Value) -> String {
    let mut by_second =
        std::collections::BTreeMap::<u64, std::collections::BTreeMap<u64, u64>>::new();
    for s in report["samples"].as_array().into_iter().flatten() {
        let (Some(t), Some(node), Some(round)) =
            (s["t"].as_f64(), s["node"].as_u64(), s["round"].as_u64())
        else {
            continue;
        };
        by_second.entry(t as u64).or_default().insert(node, round);
    }
    let lines: Vec<String> = by_second.iter().map(|(t, r)| format!("{t}s {r:?}")).collect();
    lines.join(", ")
}

/// Why the netns scenario cannot run here, if it cannot: it needs root and
/// the ip, tc and nft commands (`scripts/setup-netns.sh` installs them).
fn netns_unavailable() -> Option<String> {
    let uid = std::process::Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    let missing: Vec<&str> = ["ip", "tc", "nft"]
        .into_iter()
        .filter(|tool| {
            let found = std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output();
            !found.is_ok_and(|o| o.status.success())
        })
        .collect();
    (!missing.is_empty()).then(|| format!("{} not found", missing.join(", ")))
}

/// Five hosts on one box, one namespace each, on real sockets across a
/// bridge: 5% nftables loss and a 100 Mbit/s tbf cap on every link, and node
/// 2's link down from round 6 to 5 s into the run.
#[test]
fn lossy_links_between_namespaces_and_a_cut_node_comes_back() {
    if let Some(why) = netns_unavailable() {
        eprintln!("SKIPPED lossy_links_between_namespaces_and_a_cut_node_comes_back: {why}");
        return;
    }
    let _machine = crate::harness::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let r = chaos("lossy-links.toml", tmp.path(), &["--baseline"]);
    assert_eq!(ends(&r, "finished").len(), 5, "{}", r["node_ends"]);
    held(&r);
    let nodes = r["node_ends"].as_array().unwrap();
    let summary =
        |dir: &str, i: usize| read_json(&tmp.path().join(format!("{dir}/node-{i}/summary.json")));
    // Every round, by its summary (the last status sample may be one round
    // short of it).
    let run: Vec<serde_json::Value> = (0..nodes.len()).map(|i| summary("run", i)).collect();
    let per_round = |summary: &serde_json::Value| {
        let secs = summary["timing"]["communication_seconds"].as_f64().unwrap();
        secs / summary["rounds"].as_f64().unwrap()
    };
    let (mut slow, mut base) = (0.0, 0.0);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(run[i]["rounds"], 80, "node {i}: {n}");
        assert!(n["ip"].as_str().is_some_and(|ip| ip.starts_with("10.213.")), "{n}");
        // nftables dropped packets on every host's ingress, and the node
        // still exchanged its model across the bridge.
        assert!(n["drops"]["loss_packets"].as_u64() > Some(0), "node {i}: {n}");
        assert!(n["bytes_received"].as_u64() > Some(1_000_000), "node {i}: {n}");
        slow += per_round(&run[i]);
        base += per_round(&summary("baseline", i));
    }
    // Loss (retransmits) and the rate cap show in the exchange times.
    assert!(slow > 1.5 * base, "communication s/round: {slow:.3} with faults vs {base:.3}");
    // The cut was felt (node 2 went without its neighbours' messages) and
    // the run held together: node 2 mixed back in, its model ends near the
    // others' and the models near each other. Runs that held in step from
    // start to end measured 0.2-3.3 (40 runs, some beside other tests);
    // runs whose nodes raced apart 19.6-56.
    assert!(missing(&run[2]["strategy_drops"]) > 0, "{}", run[2]["strategy_drops"]);
    let distance = r["result"]["consensus_distance"].as_f64().unwrap();
    // Should it fail: how the nodes moved and what each went without.
    let drops: Vec<String> =
        run.iter().enumerate().map(|(i, s)| format!("node {i}: {}", s["strategy_drops"])).collect();
    assert!(
        distance < 8.0,
        "consensus distance {distance} (baseline {}); {drops:?}; events {}; rounds {}",
        r["baseline"],
        r["events"],
        rounds_by_second(&r)
    );
    let acc = |i: usize| run[i]["final"]["eval_accuracy"].as_f64().unwrap();
    let others = [0, 1, 3, 4].map(acc);
    let mean = others.iter().sum::<f64>() / 4.0;
    assert!((acc(2) - mean).abs() < 0.05, "node 2 {} vs the others {others:?}", acc(2));
    let md = std::fs::read_to_string(tmp.path().join("report.md")).unwrap();
    assert!(md.contains("## Links (netns)"), "{md}");
    // Nothing is left behind: no namespace, no bridge.
    let left = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    assert!(!left.contains("murmur-"), "namespaces left: {left}");
}
