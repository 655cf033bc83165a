//! The coordinator: a real `murmur-coordinator` beside real nodes. It links
//! no libtorch; with it, ring components that never talk to each other
//! train one model; killed, it leaves the nodes training, and restarted it
//! is taken up again.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{data_dir, murmur, murmur_bin, ok, read_json, s};
use crate::swarm::{LiveNode, start_swarm};

fn coordinator_bin() -> PathBuf {
    murmur_bin().with_file_name("murmur-coordinator")
}

/// A coordinator process, killed when dropped.
pub struct LiveCoordinator {
    pub child: Child,
    pub addr: String,
    pub api: String,
}

impl Drop for LiveCoordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LiveCoordinator {
    /// Starts one with its identity in `dir`, listening on `listen`.
    pub fn start(dir: &Path, listen: &str, args: &[&str]) -> LiveCoordinator {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .unwrap();
        let mut child = Command::new(coordinator_bin())
            .args(["--dir", s(dir), "--listen", listen, "--api", "127.0.0.1:0"])
            .args(["--progress", "json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let v: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("the coordinator did not start ({e}): {first}"));
        std::thread::spawn(move || lines.for_each(drop));
        LiveCoordinator {
            child,
            addr: v["addrs"][0].as_str().unwrap().to_string(),
            api: v["api"].as_str().unwrap().to_string(),
        }
    }

    /// Its status through `murmur status --json` (which reads coordinators).
    pub fn status(&self) -> Value {
        let out = murmur(&["status", "--json", &self.api]);
        let all: Value = serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
        all[0].clone()
    }

    fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let st = self.status();
            if cond(&st) {
                return st;
            }
            assert!(start.elapsed() < limit, "timed out waiting for {what}; last status {st}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn the_coordinator_links_no_libtorch() {
    let bin = coordinator_bin();
    assert!(bin.exists(), "{} not built", bin.display());
    let out = Command::new("ldd").arg(&bin).output().expect("ldd");
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd failed: {}", String::from_utf8_lossy(&out.stderr));
    for torch in ["libtorch", "libc10", "libgomp"] {
        assert!(!libs.contains(torch), "murmur-coordinator loads {torch}:\n{libs}");
    }
    // ... while the node does (the test would pass vacuously otherwise).
    let node = Command::new("ldd").arg(murmur_bin()).output().unwrap();
    assert!(String::from_utf8_lossy(&node.stdout).contains("libtorch"));
    // Bad values are named before anything starts.
    let bad = Command::new(&bin).args(["--sample", "0"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--sample must be > 0 (got 0)"));
}

/// 12 lenet nodes on MNIST Dirichlet(0.1) shards, in 3 rings with no edge
/// between them, alone or with a coordinator; returns cluster.json.
fn components(out: &Path, extra: &[&str]) -> Value {
    let mnist = format!("mnist:{}", s(&data_dir().join("mnist")));
    let mut args = vec![
        "cluster",
        "--nodes",
        "12",
        "--model",
        "lenet",
        "--data",
        &mnist,
        "--partition",
        "dirichlet:0.1",
        "--steps",
        "300",
        "--local-steps",
        "10",
        "--lr",
        "2e-3",
        "--round-timeout-ms",
        "5000",
        "--topology",
        "rings:3",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    ok(&murmur(&args));
    read_json(&out.join("cluster.json"))
}

fn mean_node_accuracy(cluster: &Value) -> f64 {
    let nodes = cluster["nodes"].as_array().unwrap();
    nodes.iter().map(|n| n["final"]["eval_accuracy"].as_f64().unwrap()).sum::<f64>()
        / nodes.len() as f64
}

#[test]
fn a_coordinator_joins_ring_components_into_one_model() {
    let _machine = crate::harness::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let alone = components(&tmp.path().join("alone"), &["--strategy", "gossip"]);
    let joined = components(
        &tmp.path().join("joined"),
        &[
            "--strategy",
            "semidec",
            "--coordinator",
            "--target",
            "s2a",
            "--sample",
            "4",
            "--sample-every",
            "5",
        ],
    );
    let (d_alone, d_joined) = (
        alone["consensus_distance"].as_f64().unwrap(),
        joined["consensus_distance"].as_f64().unwrap(),
    );
    let (a_alone, a_joined) = (mean_node_accuracy(&alone), mean_node_accuracy(&joined));
    eprintln!(
        "12 nodes, rings:3, MNIST Dirichlet(0.1): consensus distance {d_alone:.4} alone, {d_joined:.4} with the coordinator; mean node accuracy {a_alone:.4} vs {a_joined:.4}"
    );
    assert!(d_joined * 10.0 <= d_alone, "consensus {d_joined} vs {d_alone} without");
    assert!(a_joined > a_alone, "accuracy {a_joined} vs {a_alone} without");
    let c = &joined["coordinator"];
    // 30 rounds, sampled every 5th: 6 sampling rounds, each averaged.
    assert_eq!(c["rounds_aggregated"].as_u64(), Some(6), "{c}");
    for n in joined["nodes"].as_array().unwrap() {
        assert_eq!(n["exit_status"], 0);
        assert!(n["coordinator"]["averages"].as_u64().unwrap() >= 5, "{}", n["coordinator"]);
    }
}

/// A coordinator SIGKILLed mid-run: the nodes go on alone (one wait each at
/// most) and say it is lost; restarted with the same identity and port, it
/// is taken up again.
#[test]
fn a_killed_coordinator_leaves_the_nodes_training_and_a_restarted_one_is_taken_up() {
    let tmp = tempfile::tempdir().unwrap();
    let coord_dir = tmp.path().join("coordinator");
    std::fs::create_dir_all(&coord_dir).unwrap();
    let coord_args =
        ["--sample", "2", "--sample-every", "2", "--target", "s2a", "--deadline-ms", "1000"];
    let mut coordinator = LiveCoordinator::start(&coord_dir, "/ip4/127.0.0.1/tcp/0", &coord_args);
    let addr = coordinator.addr.clone();
    let args = [
        "--data",
        "synthetic",
        "--hidden",
        "32",
        "--rounds",
        "100000",
        "--local-steps",
        "5",
        "--round-timeout-ms",
        "1000",
        "--strategy",
        "semidec",
        "--coordinator",
        &addr,
        "--coordinator-wait-ms",
        "3000",
    ];
    let mut nodes: Vec<LiveNode> = start_swarm(tmp.path(), 4, &args);
    coordinator.wait_for("5 averaged rounds", Duration::from_secs(90), |st| {
        st["rounds_aggregated"].as_u64() >= Some(5)
    });
    let before = nodes[1].status();
    let averages_before = before["coordinator"]["averages"].as_u64().unwrap();
    let timeouts_before = before["coordinator"]["timeouts"].as_u64().unwrap();
    assert!(averages_before >= 1, "{before}");
    assert_eq!(before["coordinator"]["state"], "ok");
    // SIGKILL: no goodbye.
    coordinator.child.kill().unwrap();
    coordinator.child.wait().unwrap();
    let round_at_kill = nodes[1].status()["round"].as_u64().unwrap();
    let lost = nodes[1].wait_for("the coordinator lost", Duration::from_secs(40), |st| {
        st["coordinator"]["state"] == "lost"
    });
    // The nodes kept training meanwhile, and keep going.
    let later =
        nodes[1].wait_for("rounds without the coordinator", Duration::from_secs(60), |st| {
            st["round"].as_u64().unwrap() >= lost["round"].as_u64().unwrap() + 20
        });
    assert!(later["round"].as_u64().unwrap() > round_at_kill + 20);
    // Over 10 sampling rounds (H_s = 2) without it, one wait ended without
    // it (a request or an average; two if the kill fell between them), not
    // one per sampling round.
    let waits = later["coordinator"]["timeouts"].as_u64().unwrap() - timeouts_before;
    assert!((1..=2).contains(&waits), "{waits} waits: {}", later["coordinator"]);
    // Back, with the same identity (its directory) and port.
    let port = addr.split("/tcp/").nth(1).unwrap().split('/').next().unwrap();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let back = LiveCoordinator::start(&coord_dir, &listen, &coord_args);
    assert_eq!(back.addr, addr, "same peer id and port");
    back.wait_for("averages after the restart", Duration::from_secs(90), |st| {
        st["rounds_aggregated"].as_u64() >= Some(3)
    });
    nodes[1].wait_for("the coordinator back", Duration::from_secs(40), |st| {
        st["coordinator"]["state"] == "ok"
            && st["coordinator"]["averages"].as_u64().unwrap() > averages_before + 1
    });
    for node in &mut nodes {
        ok(&murmur(&["shutdown", &node.api]));
        assert_eq!(node.wait_exit(Duration::from_secs(60)), 0, "{}", node.dir.display());
        let summary = read_json(&node.dir.join("summary.json"));
        assert!(summary["coordinator"]["averages"].as_u64().unwrap() > 0, "{summary}");
    }
}
