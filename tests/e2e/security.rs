//! A node among peers it should not trust: runs that cannot form fail
//! loudly, and logs written to files stay plain text.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{murmur, murmur_bin, ok, s};
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
        .args(["--swarm-key", s(&key_b), "--min-members", "2", "--join-timeout-ms", "4000"])
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
