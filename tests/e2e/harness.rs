//! Running the `murmur` binary and reading what it wrote.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The release `murmur` binary next to this test executable (`make test`
/// builds it first), or `MURMUR_BIN`.
pub fn murmur_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MURMUR_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-HASH -> target/<profile>/murmur
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("murmur");
    assert!(
        bin.exists(),
        "{} not found: run `make test` (it builds the binary first) or set MURMUR_BIN",
        bin.display()
    );
    bin
}

/// The shared test data directory (`MURMUR_DATA_DIR`); fails loudly if absent.
pub fn data_dir() -> PathBuf {
    let dir = std::env::var("MURMUR_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"));
    assert!(
        dir.join("mnist").is_dir(),
        "test data not found at {}: set MURMUR_DATA_DIR",
        dir.display()
    );
    dir
}

/// `murmur ARGS...` with one intra-op thread, waiting for it to exit.
pub fn murmur(args: &[&str]) -> Output {
    murmur_env(args, &[])
}

pub fn murmur_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(murmur_bin());
    cmd.args(args).env("MURMUR_THREADS", "1").env_remove("MURMUR_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn murmur")
}

/// Asserts success and returns stdout.
pub fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "murmur failed ({:?})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Messages a node went without, from its `strategy_drops`: at the
/// deadline, or after the straggler grace once the sender had spent its
/// credit.
pub fn missing(drops: &serde_json::Value) -> u64 {
    ["missing_at_deadline", "missing_after_grace"]
        .iter()
        .map(|k| drops[*k].as_u64().unwrap_or(0))
        .sum()
}

/// Held by the tests that load the machine most (a dozen training
/// processes) and by those that measure time against a baseline, so that
/// the two never run at once: on 2 cores a 12-node cluster beside a timing
/// test makes its baseline, not its effect, what it measures.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
