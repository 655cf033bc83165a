//! Live `murmur run` processes on 127.0.0.1 that a test can talk to while
//! they run: each node's p2p and API addresses, its status through
//! `murmur status --json`, and the independent Python gRPC client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{murmur, murmur_bin, s};

/// One running node.
pub struct LiveNode {
    pub child: Child,
    pub dir: PathBuf,
    pub peer_id: String,
    pub p2p: String,
    pub api: String,
    pub metrics: Option<String>,
}

impl Drop for LiveNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LiveNode {
    /// `murmur run --data-dir DIR --node I --nodes N ARGS...`; returns once
    /// it listens (its first progress line names its addresses). Its stderr
    /// goes to DIR.log, after what earlier runs of that node wrote there.
    pub fn start(
        dir: &Path,
        i: usize,
        n: usize,
        bootstrap: Option<&str>,
        args: &[&str],
    ) -> LiveNode {
        let mut cmd = Command::new(murmur_bin());
        cmd.args([
            "run",
            "--data-dir",
            s(dir),
            "--nodes",
            &n.to_string(),
            "--node",
            &i.to_string(),
        ])
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--progress",
            "json",
            "--join-timeout-ms",
            "20000",
        ])
        .args(args)
        .env("MURMUR_THREADS", "1")
        .env_remove("MURMUR_LOG")
        .stdout(Stdio::piped())
        .stderr(log_file(dir));
        if let Some(b) = bootstrap {
            cmd.args(["--bootstrap", b]);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let v: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("node {i} did not start ({e}): {first}\n{}", read_log(dir)));
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        LiveNode {
            child,
            dir: dir.to_path_buf(),
            peer_id: v["peer_id"].as_str().unwrap().to_string(),
            p2p: v["addrs"][0].as_str().unwrap().to_string(),
            api: v["api"].as_str().expect("the API is on by default").to_string(),
            metrics: v["metrics"].as_str().map(str::to_string),
        }
    }

    /// The node's status through `murmur status --json`.
    pub fn status(&self) -> Value {
        let out = murmur(&["status", "--json", &self.api]);
        let text = String::from_utf8_lossy(&out.stdout);
        let all: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("murmur status printed no JSON ({e}): {text}"));
        all[0].clone()
    }

    /// Polls the status until `cond` holds; returns that status.
    pub fn wait_for(&self, what: &str, limit: Duration, cond: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let st = self.status();
            if cond(&st) {
                return st;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; last status {st}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the process to exit; returns its status code.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if start.elapsed() >= limit {
                let log = read_log(&self.dir);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                panic!(
                    "{} did not exit within {limit:?}; its log ends:\n{tail}",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn log_file(dir: &Path) -> std::fs::File {
    let path = dir.with_extension("log");
    std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap()
}

pub fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
}

/// `n` nodes in `root/node-I`, node 0 the bootstrap of the others, each with `args`.
pub fn start_swarm(root: &Path, n: usize, args: &[&str]) -> Vec<LiveNode> {
    let first = LiveNode::start(&root.join("node-0"), 0, n, None, args);
    let boot = first.p2p.clone();
    let mut nodes = vec![first];
    for i in 1..n {
        nodes.push(LiveNode::start(&root.join(format!("node-{i}")), i, n, Some(&boot), args));
    }
    nodes
}

/// The Python interpreter of the test venv (`make test` sets it up).
fn python() -> PathBuf {
    let p = std::env::var("MURMUR_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|_| {
        panic!("MURMUR_TEST_PYTHON is not set: run `make test` (it creates the gRPC client venv with scripts/setup-test-venv.sh)")
    });
    assert!(p.exists(), "MURMUR_TEST_PYTHON={} does not exist", p.display());
    p
}

/// Runs `tests/e2e/grpc_client.py ADDR ARGS...` and parses what it prints.
pub fn grpc_client(addr: &str, args: &[&str]) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("e2e/grpc_client.py");
    let out: Output = Command::new(python()).arg(script).arg(addr).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpc_client.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("grpc_client.py printed no JSON ({e}): {text}"))
}
