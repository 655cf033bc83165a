//! A node among peers it should not trust: runs that cannot form fail
//! loudly, and logs written to files stay plain text.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{murmur, murmur_bin, ok, read_json, s};
use crate::swarm::{LiveNode, read_log};

/// A node whose swarm key differs from the run's cannot join it; with
/// `--min-members 2` it says so and exits non-zero instead of training
/// alone and reporting success.
#[test]
fn a_node_with_the_wrong_swarm_key_and_min_members_exits_non_zero_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let (key_a, key_b) = (tmp.path().join("a.key"), tmp.path().join("b.key"));
    ok(&murmur(&["swarm-key", s(&key_a)]));
    ok(&murmur(&["swarm-key", s(&key_b)]));
    let args = ["--data", "synthetic", "--rounds", "100000", "--swarm-key", s(&key_a)];
    let a = LiveNode::start(&tmp.path().join("a"), 0, 2, None, &args);
    let b_dir = tmp.path().join("b");
    let started = Instant::now();
    let mut b = Command::new(murmur_bin())
        .args(["run", "--data-dir", s(&b_dir), "--nodes", "2", "--node", "1"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", &a.p2p])
        .args(["--swarm-key", s(&key_b), "--min-members", "2", "--join-timeout-ms", "10000"])
        .args(["--data", "synthetic", "--rounds", "5"])
        .env("MURMUR_THREADS", "1")
        .env("MURMUR_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = b.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the node did not give up");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut b.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("no run formed: 1 of --min-members 2 members"), "{err}");
    assert!(err.contains("0 of 1 peers joined"), "{err}");
    assert!(err.contains("dial_handshake_failed"), "names what was refused: {err}");
    assert!(!b_dir.join("summary.json").exists(), "no summary claims a run");
    // The node with the run's key refused the stranger's handshakes.
    let st = a.status();
    assert_eq!(st["live_members"], 1, "{st}");
    // Logs that go to a pipe or file carry no terminal colour codes.
    assert!(err.lines().count() > 1, "info lines were logged: {err}");
    let log = read_log(&a.dir);
    assert!(!err.contains('\u{1b}') && !log.contains('\u{1b}'), "{err}\n{log}");
}

/// An API beyond 127.0.0.1 with no token would let anyone stop the node:
/// refused before anything is written, unless the operator says so.
#[test]
fn an_api_beyond_loopback_needs_a_token_or_api_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let out = murmur(&["run", "--data-dir", s(&dir), "--data", "synthetic", "--api", "0.0.0.0:0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--api 0.0.0.0:0") && err.contains("--api-insecure"), "{err}");
    assert!(!dir.exists(), "nothing written: {}", dir.display());
}

/// A checkpoint is a file: `--resume` takes training state and options from
/// it, but never faults, endpoints or security options, and refuses a
/// round beyond the run.
#[test]
fn a_crafted_checkpoint_cannot_add_faults_move_the_api_or_end_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "--data-dir", s(&dir), "--listen", "/ip4/127.0.0.1/tcp/0"];
        args.extend_from_slice(&["--data", "synthetic", "--progress", "json"]);
        args.extend_from_slice(extra);
        murmur(&args)
    };
    ok(&run(&["--rounds", "3", "--local-steps", "5"]));
    let meta_path = dir.join("checkpoint/meta.json");
    let honest = read_json(&meta_path);
    let write = |meta: &serde_json::Value| {
        std::fs::write(&meta_path, serde_json::to_vec_pretty(meta).unwrap()).unwrap();
    };
    // A round far beyond the run.
    let mut far = honest.clone();
    far["options"]["round"] = serde_json::json!(u64::MAX);
    write(&far);
    let out = run(&["--resume", "--rounds", "6"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("beyond this run's 6 rounds"), "{err}");
    // Faults, an open API and metrics added to the saved options.
    let mut crafted = honest.clone();
    crafted["options"]["run"]["fault"] = serde_json::json!(["crash:4"]);
    crafted["options"]["run"]["api"] = serde_json::json!("0.0.0.0:0");
    crafted["options"]["run"]["api-insecure"] = serde_json::json!(true);
    crafted["options"]["run"]["metrics"] = serde_json::json!("0.0.0.0:0");
    write(&crafted);
    let out = run(&["--resume", "--rounds", "6"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "no injected crash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(first["api"].as_str().unwrap().starts_with("127.0.0.1:"), "{first}");
    assert!(first["metrics"].is_null(), "{first}");
    let summary = read_json(&dir.join("summary.json"));
    assert_eq!(summary["rounds"], 6);
    // What the node saved back carries none of it.
    let saved = read_json(&meta_path);
    for key in ["fault", "api", "api-insecure", "metrics"] {
        assert!(saved["options"]["run"].get(key).is_none(), "{key}: {}", saved["options"]);
    }
}

/// A receiver takes payloads in its run's encoding and f32, nothing else:
/// `murmur bench-transfer` moves bf16 between two processes when both ends
/// name it, and a receiver left at f32 refuses it and the sender says so.
#[test]
fn a_payload_moves_only_in_the_encodings_the_receiver_accepts() {
    let transfer = |recv_encoding: &str| {
        let common = ["bench-transfer", "--mib", "1", "--repeat", "2", "--threads", "1"];
        let mut recv = Command::new(murmur_bin())
            .args(common)
            .args(["--role", "recv", "--encoding", recv_encoding])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        let mut lines = std::io::BufReader::new(recv.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut lines, &mut first).unwrap();
        let addr: String = serde_json::from_str(first.trim()).unwrap();
        let send_args = ["--role", "send", "--peer", &addr, "--encoding", "bf16"];
        let sent = murmur(&common.iter().copied().chain(send_args).collect::<Vec<_>>());
        let _ = recv.kill();
        let _ = recv.wait();
        sent
    };
    let sent = ok(&transfer("bf16"));
    let records: Vec<serde_json::Value> =
        sent.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 1 MiB of f32 values, two bytes each in bf16.
    assert!(records.iter().any(|r| r["body_bytes"] == (1 << 20) / 2), "{sent}");
    let refused = transfer("f32");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("refused the payload"), "{err}");
}
