//! Every fault of the injector, end to end on a small cluster of real
//! processes: its effect shows in the status or summary of the node that
//! has it and of its peers. (Robust aggregation against two sign-flipping
//! nodes out of eight is a chaos scenario: `chaos.rs`.)

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{data_dir, missing, murmur, ok, read_json, s};
use crate::swarm::start_swarm;

/// A `murmur cluster` of `n` nodes on the built-in data over a complete
/// graph, plus `extra`; returns cluster.json.
fn cluster(out: &Path, n: usize, rounds: u64, extra: &[&str]) -> Value {
    let (n, rounds) = (n.to_string(), rounds.to_string());
    let mut args = vec![
        "cluster",
        "--nodes",
        &n,
        "--data",
        "synthetic",
        "--hidden",
        "32",
        "--topology",
        "complete",
        "--rounds",
        &rounds,
        "--lr",
        "1e-2",
        "--out",
        s(out),
    ];
    if !extra.contains(&"--round-timeout-ms") {
        args.extend(["--round-timeout-ms", "2000"]);
    }
    if !extra.contains(&"--local-steps") {
        args.extend(["--local-steps", "10"]);
    }
    args.extend_from_slice(extra);
    ok(&murmur(&args));
    read_json(&out.join("cluster.json"))
}

fn summary(out: &Path, i: usize) -> Value {
    read_json(&out.join(format!("node-{i}/summary.json")))
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

#[test]
fn dropping_30_percent_of_a_nodes_messages_shows_as_missing_messages_at_its_peers() {
    let tmp = tempfile::tempdir().unwrap();
    // Every exchange waits the whole deadline for every neighbour (no
    // straggler grace), so that the three stay in step and each drop is
    // waited for. With the grace, one run in about fifteen beside three
    // busy loops (and one on CI) failed: both of node 1's messages for an
    // early round were dropped, which stalled all three for a deadline;
    // node 1 came out of it a few rounds ahead of peers that then ran over
    // a fifth slower on the loaded cores, so it no longer waited for them
    // (as the grace intends), finished first and left, and its drops in
    // the rounds its peers ran after that were missed by nobody: 24
    // dropped against 19 missed or stood in for.
    let c = cluster(
        tmp.path(),
        3,
        30,
        &[
            "--round-timeout-ms",
            "200",
            "--straggler-grace",
            "off",
            "--node-fault",
            "1=drop:0.3:out",
        ],
    );
    let nodes = c["nodes"].as_array().unwrap();
    let dropped = count(&nodes[1]["fault_effects"], "dropped_out");
    // Each attempt to a connected peer draws: 30 rounds x 2 neighbours,
    // and the retries of sends a peer refused. Measured here: 24-25 of
    // 68-70 beside three busy loops.
    let attempts = dropped + count(&summary(tmp.path(), 1)["bytes"], "messages_sent");
    let fraction = dropped as f64 / attempts as f64;
    assert!((0.1..=0.55).contains(&fraction), "node 1 dropped {dropped} of {attempts}");
    // A dropped message is missed, or stood in for by node 1's newer model
    // when node 1 is ahead. (Before drops were drawn only for connected
    // peers, a run beside the whole suite counted 24 dropped against 18
    // missed, most likely node 1, behind, retrying sends to peers that
    // had finished.)
    let drops = |i: usize| &nodes[i]["strategy_drops"];
    let missed: u64 = [0, 2].iter().map(|&i| missing(drops(i))).sum();
    let stood_in: u64 = [0, 2].iter().map(|&i| count(drops(i), "mixed_newest_ahead")).sum();
    assert!(
        missed + stood_in >= dropped && missed > 0,
        "peers missed {missed} and stood in for {stood_in}, node 1 dropped {dropped}"
    );
}

#[test]
fn a_partition_leaves_no_bytes_between_its_two_sides() {
    let tmp = tempfile::tempdir().unwrap();
    // The identities first, so that nodes 1 and 2 can be told to cut each
    // other off (a partition splits both sides; node 0 still reaches both).
    let id = |i: usize| {
        let out = ok(&murmur(&["id", "--data-dir", s(&tmp.path().join(format!("node-{i}")))]));
        out.trim().to_string()
    };
    let (peer1, peer2) = (id(1), id(2));
    let (cut1, cut2) = (format!("1=partition:{peer2}"), format!("2=partition:{peer1}"));
    let c = cluster(
        tmp.path(),
        3,
        12,
        // Cut off from the start, nodes 1 and 2 never connect, so neither
        // becomes the other's member (a member must hold a connection):
        // each starts once it has node 0, and all three train at once.
        // (Waiting out a join timeout for all three instead, they found
        // node 0 finished and gone: it had its three members at once, ran
        // its 12 short rounds in a second, and said it was leaving.) Node 0
        // too starts with the first of them; rounds of 1000 steps (several
        // seconds in all) let the other, started a second or two later
        // under load, find it still training.
        &[
            "--local-steps",
            "1000",
            "--round-timeout-ms",
            "1000",
            "--start-members",
            "2",
            "--join-timeout-ms",
            "10000",
            "--node-fault",
            &cut1,
            "--node-fault",
            &cut2,
        ],
    );
    let (s0, s1, s2) = (summary(tmp.path(), 0), summary(tmp.path(), 1), summary(tmp.path(), 2));
    assert_eq!((s1["peer_id"].as_str(), s2["peer_id"].as_str()), (Some(&*peer1), Some(&*peer2)));
    let peer1 = peer1.as_str();
    let bytes = |s: &Value, p: &str| {
        count(&s["traffic_by_peer"][p], "bytes_sent")
            + count(&s["traffic_by_peer"][p], "bytes_received")
    };
    assert_eq!(
        bytes(&s1, &peer2),
        0,
        "node 1 exchanged bytes with node 2: {}",
        s1["traffic_by_peer"]
    );
    assert_eq!(
        bytes(&s2, peer1),
        0,
        "node 2 exchanged bytes with node 1: {}",
        s2["traffic_by_peer"]
    );
    // Both still talk to node 0, and every node finishes its rounds.
    assert!(bytes(&s0, peer1) > 0 && bytes(&s0, &peer2) > 0);
    assert!(
        c["nodes"].as_array().unwrap().iter().all(|n| n["exit_status"] == 0 && n["rounds"] == 12)
    );
    // Each of nodes 1 and 2 started with node 0 and never the other (no
    // bytes above); node 0 with one of them or both.
    for s in [&s1, &s2] {
        assert_eq!(s["members_at_start"], 2, "{s}");
    }
    assert!((2..=3).contains(&s0["members_at_start"].as_u64().unwrap()), "{s0}");
}

#[test]
fn an_injected_crash_exits_non_zero_and_the_others_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path(), 3, 12, &["--node-fault", "2=crash:4"]);
    let nodes = c["nodes"].as_array().unwrap();
    assert_eq!(nodes[2]["exit_status"], 70);
    assert!(!tmp.path().join("node-2/summary.json").exists(), "a crash writes no summary");
    for i in [0, 1] {
        assert_eq!(nodes[i]["exit_status"], 0);
        assert_eq!(nodes[i]["rounds"], 12);
        assert!(nodes[i]["final"]["eval_accuracy"].as_f64().unwrap() > 0.5);
    }
}

#[test]
fn nan_messages_are_refused_by_every_honest_peer_whose_model_stays_finite() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path(), 4, 15, &["--node-fault", "3=nan"]);
    let nodes = c["nodes"].as_array().unwrap();
    assert!(count(&nodes[3]["fault_effects"], "corrupted") >= 15 * 3);
    for n in &nodes[..3] {
        // Every round's NaN message refused by the wire, and not waited for
        // (waiting would cost a deadline in each of the 15 rounds). A node
        // whose start lagged (its first heartbeats from a peer came relayed
        // before the connection, `heartbeat_not_connected`, so it refused
        // that peer's first payloads) can wait out a few deadlines for
        // honest peers that ran ahead: measured up to 3, in 1 of 25 runs
        // with three clusters at once.
        assert!(count(&n["refusals"], "non_finite") >= 14, "{n}");
        assert!(count(&n["strategy_drops"], "missing_at_deadline") <= 4, "{n}");
        let loss = n["final"]["eval_loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss < 1.0, "{n}");
    }
}

#[test]
fn a_delay_or_a_bandwidth_cap_slows_the_exchanges_of_the_node_and_its_peers() {
    let _machine = crate::harness::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    // The three clusters run at once, so that the baseline shares whatever
    // load the machine is under (measured one at a time beside other e2e
    // tests, the baseline's own communication once took 1.36 s, 0.1-0.3 s
    // otherwise, and a ratio to it measured the load, not the fault).
    let root = tmp.path().to_path_buf();
    let run = |name: &'static str, fault: Option<&'static str>| {
        let root = root.clone();
        std::thread::spawn(move || {
            let args: Vec<&str> = fault.map_or(Vec::new(), |f| vec!["--node-fault", f]);
            cluster(&root.join(name), 3, 10, &args)
        })
    };
    let (base, delayed, capped) = (
        run("base", None),
        run("delay", Some("1=delay:300ms")),
        run("cap", Some("1=bandwidth:20kB/s")),
    );
    let (base, delayed, capped) =
        (base.join().unwrap(), delayed.join().unwrap(), capped.join().unwrap());
    let comm =
        |c: &Value, i: usize| c["nodes"][i]["timing"]["communication_seconds"].as_f64().unwrap();
    assert!(count(&delayed["nodes"][1]["fault_effects"], "delayed") >= 20);
    // The peers wait for node 1's messages, 300 ms late (rounds overlap, so
    // not the full 300 ms each; measured about 1.5 s over 10 rounds).
    for i in [0, 2] {
        let (d, b) = (comm(&delayed, i), comm(&base, i));
        assert!(d >= 1.0 && d >= b + 0.5, "node {i}: {d} s (no delay: {b} s)");
    }
    // mlp 32-32-32-10: 2,442 values, about 9.8 kB a payload; two a round at
    // 20 kB/s for the node as a whole take about a second.
    for i in [0, 2] {
        let (c, b) = (comm(&capped, i), comm(&base, i));
        assert!(c >= 2.0 && c >= b + 1.5, "node {i}: {c} s (no cap: {b} s)");
    }
}

#[test]
fn byzantine_senders_are_caught_by_the_norm_bound_of_their_peers() {
    let tmp = tempfile::tempdir().unwrap();
    for mode in ["sign-flip", "scale:10", "noise:1"] {
        let out = tmp.path().join(mode.replace(':', "-"));
        let spec = format!("2={mode}");
        let c = cluster(&out, 3, 15, &["--norm-bound", "3", "--node-fault", &spec]);
        let nodes = c["nodes"].as_array().unwrap();
        assert!(count(&nodes[2]["fault_effects"], "corrupted") >= 30, "{mode}: {}", nodes[2]);
        for n in &nodes[..2] {
            // Every mix refuses node 2 (the first measures from the start
            // params), but the last when node 2 finished and left while it
            // still waited for the third: then its message is not weighed
            // (sender_left; once on a full run, 14 refused and 1 left).
            let drops = &n["strategy_drops"];
            let refused = count(drops, "norm_bound");
            assert!(refused + count(drops, "sender_left") >= 15, "{mode}: {n}");
            assert!(refused >= 14, "{mode}: {n}");
            assert!(n["final"]["eval_accuracy"].as_f64().unwrap() > 0.6, "{mode}: {n}");
        }
    }
}

#[test]
fn label_flip_trains_a_node_on_wrong_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let c = cluster(tmp.path(), 3, 20, &["--strategy", "merge", "--node-fault", "2=label-flip"]);
    let nodes = c["nodes"].as_array().unwrap();
    let local = |i: usize| nodes[i]["local"]["eval_accuracy"].as_f64().unwrap();
    assert!(local(2) < 0.2, "the flipped node's own model: {}", local(2));
    assert!(local(0) > 0.7 && local(1) > 0.7, "honest: {} {}", local(0), local(1));
    // Its peers feel it in the merged model.
    let merged = c["merged"]["eval_accuracy"].as_f64().unwrap();
    assert!(merged < (local(0) + local(1)) / 2.0, "merged {merged}");
    // Text has no labels: refused before anything runs.
    let text = format!("text:{}", s(&data_dir().join("tinyshakespeare/input.txt")));
    let refused = murmur(&[
        "run",
        "--data-dir",
        s(&tmp.path().join("text")),
        "--nodes",
        "1",
        "--data",
        &text,
        "--fault",
        "label-flip",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("label-flip needs labelled data"),
        "{refused:?}"
    );
}

#[test]
fn a_pause_stops_a_node_and_its_peers_see_it_fall_silent() {
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--data",
        "synthetic",
        "--hidden",
        "32",
        "--rounds",
        "400",
        "--local-steps",
        "10",
        "--round-timeout-ms",
        "500",
        // Its peers wait out the deadline for the paused node every round,
        // so they are still running when looked at (with the grace they
        // would finish their 400 rounds in the first second of the pause).
        "--straggler-grace",
        "off",
    ];
    let mut nodes = start_swarm(tmp.path(), 3, &args);
    nodes[1].wait_for("training", Duration::from_secs(60), |st| st["round"].as_u64() >= Some(3));
    // Long enough to outlast the status polls below on a loaded machine:
    // each is a `murmur status` process, and under `make test`'s parallel
    // load four of them once took longer than a 6 s pause.
    ok(&murmur(&["fault", "inject", &nodes[1].api, "pause,for=15s"]));
    nodes[1].wait_for("the pause", Duration::from_secs(2), |st| st["phase"] == "paused");
    // Sends already under way when the pause began may still finish; then nothing moves.
    std::thread::sleep(Duration::from_millis(300));
    let paused = nodes[1].status();
    let missing_before = missing(&nodes[0].status()["strategy_drops"]);
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let still = nodes[1].status();
    assert_eq!(still["phase"], "paused");
    assert_eq!(still["step"], paused["step"], "no training while paused");
    assert_eq!(
        still["traffic"]["bytes_sent"], paused["traffic"]["bytes_sent"],
        "no sending while paused"
    );
    let missing_during = missing(&nodes[0].status()["strategy_drops"]);
    assert!(
        missing_during > missing_before,
        "node 0 misses node 1's messages: {missing_before} -> {missing_during}"
    );
    let step = paused["step"].as_u64().unwrap();
    nodes[1].wait_for("the node to resume", Duration::from_secs(40), |st| {
        st["step"].as_u64() > Some(step + 10)
    });
    assert!(t.elapsed() >= Duration::from_millis(1500));
    for n in &mut nodes {
        assert_eq!(n.wait_exit(Duration::from_secs(120)), 0);
    }
}
