//! The deploy files, checked offline: the Kubernetes manifests against a
//! named Kubernetes version's schemas, the systemd unit by systemd itself.
//! (The compose file runs for real in `make compose-test`.)

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{murmur, murmur_bin, murmur_env, ok, read_json, s};

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The Kubernetes version the manifests are written for.
const KUBERNETES: &str = "1.33.0";

#[test]
fn the_kubernetes_manifests_validate_strictly_against_kubernetes_1_33() {
    let python = PathBuf::from(std::env::var("MURMUR_TEST_PYTHON").expect(
        "MURMUR_TEST_PYTHON is not set: run `make test` (scripts/setup-test-venv.sh installs kubernetes-validate)",
    ));
    let validate = python.with_file_name("kubernetes-validate");
    let dir = deploy_dir().join("k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let out = Command::new(&validate)
        .args(["--kubernetes-version", KUBERNETES, "--strict"])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", validate.display()));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    // One line per resource, each passed: StatefulSet, Service, ConfigMap,
    // Secret, the coordinator's Deployment and Service.
    for kind in [
        "statefulset/murmur",
        "service/murmur",
        "configmap/murmur-run",
        "secret/murmur-api-token",
        "deployment/murmur-coordinator",
        "service/murmur-coordinator",
    ] {
        assert!(text.contains(&format!("passed for resource {kind} ")), "{kind}: {text}");
    }
    // The kustomization names every manifest of the node set.
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for f in ["configmap.yaml", "secret.yaml", "service.yaml", "statefulset.yaml"] {
        assert!(kustomization.contains(f), "{f}");
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("SKIPPED: systemd-analyze is not installed here; the unit is not verified");
        return;
    }
    let unit = std::fs::read_to_string(deploy_dir().join("systemd/murmur.service")).unwrap();
    // Verified as installed, with ExecStart at this build's binary (verify
    // checks that it exists and is executable).
    let unit = unit.replace("/usr/local/bin/murmur", murmur_bin().to_str().unwrap());
    assert!(unit.contains("Restart=on-failure") && unit.contains("MURMUR_RESUME=auto"));
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("murmur.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Unknown keys are only warned about: any complaint fails the test.
    assert!(err.trim().is_empty(), "systemd-analyze verify complained:\n{err}");
}

/// What a supervisor's restart runs (systemd's unit, compose, Kubernetes):
/// `--resume=auto` starts afresh in an empty directory and continues from
/// the checkpoint when there is one, instead of refusing either.
#[test]
fn resume_auto_starts_afresh_then_continues_from_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("node");
    let run = |rounds: &str| {
        murmur_env(
            &["run", "--data-dir", s(&dir), "--nodes", "1", "--node", "0", "--data", "synthetic"],
            &[("MURMUR_ROUNDS", rounds), ("MURMUR_LOCAL_STEPS", "5"), ("MURMUR_RESUME", "auto")],
        )
    };
    ok(&run("3"));
    let first = read_json(&dir.join("summary.json"));
    assert_eq!(first["rounds"], 3);
    assert!(first["resumed_from_round"].is_null(), "{first}");
    ok(&run("6"));
    let second = read_json(&dir.join("summary.json"));
    assert_eq!(second["rounds"], 6);
    assert_eq!(second["resumed_from_round"], 3, "{second}");
    // Plain --resume still insists on a checkpoint.
    let empty = tmp.path().join("empty");
    let out = murmur(&["run", "--data-dir", s(&empty), "--nodes", "1", "--node", "0", "--resume"]);
    assert_eq!(out.status.code(), Some(2));
}
