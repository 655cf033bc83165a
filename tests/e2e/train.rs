//! `murmur train`: learning on real data, exact resume, configuration layers
//! and refusals of bad input.

use std::collections::HashMap;

use crate::harness::{data_dir, murmur, murmur_env, ok, read_json, s};

#[test]
fn lenet_on_mnist_reaches_97_percent_held_out() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mnist = format!("mnist:{}", s(&data_dir().join("mnist")));
    ok(&murmur(&[
        "train",
        "--model",
        "lenet",
        "--data",
        &mnist,
        "--steps",
        "1500",
        "--batch-size",
        "64",
        "--lr",
        "2e-3",
        "--schedule",
        "cosine",
        "--eval-every",
        "0",
        "--out",
        s(&out),
    ]));
    let summary = read_json(&out.join("summary.json"));
    // Only the 10k test split is shipped: the last 20% is held out.
    assert_eq!(summary["holdout"]["train_examples"], 8000);
    assert_eq!(summary["holdout"]["heldout_examples"], 2000);
    let acc = summary["final"]["eval_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.97, "lenet held-out accuracy {acc}");
    assert!(summary["final"]["eval_perplexity"].is_null());
}

#[test]
fn chargpt_on_shakespeare_beats_unigram_entropy() {
    let text_path = data_dir().join("tinyshakespeare/input.txt");
    let text = std::fs::read_to_string(&text_path).unwrap();
    let chars: Vec<char> = text.chars().collect();
    let heldout = &chars[chars.len() - chars.len() / 10..];
    // Entropy (nats) of the held-out text under its own unigram distribution:
    // a lower bound for any model that ignores context.
    let mut counts: HashMap<char, f64> = HashMap::new();
    for c in heldout {
        *counts.entry(*c).or_default() += 1.0;
    }
    let n = heldout.len() as f64;
    let entropy: f64 = counts.values().map(|k| -(k / n) * (k / n).ln()).sum();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&murmur(&[
        "train",
        "--model",
        "chargpt",
        "--data",
        &format!("text:{}", s(&text_path)),
        "--steps",
        "400",
        "--batch-size",
        "32",
        "--context",
        "64",
        "--dim",
        "96",
        "--layers",
        "2",
        "--heads",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "40",
        "--schedule",
        "cosine",
        "--eval-every",
        "0",
        "--out",
        s(&out),
    ]));
    let summary = read_json(&out.join("summary.json"));
    let loss = summary["final"]["eval_loss"].as_f64().unwrap();
    let ppl = summary["final"]["eval_perplexity"].as_f64().unwrap();
    assert!(summary["final"]["eval_accuracy"].is_null());
    assert!((ppl - loss.exp()).abs() < 1e-6 * ppl);
    assert!(loss < entropy - 0.6, "held-out loss {loss:.3} vs unigram entropy {entropy:.3}");
}

#[test]
fn mlp_learns_synthetic_data_a_linear_model_cannot() {
    let tmp = tempfile::tempdir().unwrap();
    let acc = |hidden: &str, name: &str| {
        let out = tmp.path().join(name);
        ok(&murmur(&[
            "train",
            "--model",
            "mlp",
            "--hidden",
            hidden,
            "--data",
            "synthetic",
            "--steps",
            "2000",
            "--eval-every",
            "0",
            "--out",
            s(&out),
        ]));
        read_json(&out.join("summary.json"))["final"]["eval_accuracy"].as_f64().unwrap()
    };
    let mlp = acc("128,128", "mlp");
    let linear = acc("", "linear");
    assert!(mlp >= 0.9, "mlp accuracy {mlp}");
    assert!(linear < mlp - 0.2, "linear accuracy {linear} vs mlp {mlp}: the task is too easy");
}

#[test]
fn resume_continues_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let (split, whole) = (tmp.path().join("split"), tmp.path().join("whole"));
    let common = [
        "train",
        "--model",
        "mlp",
        "--data",
        "synthetic",
        "--optimizer",
        "sgd",
        "--nesterov",
        "--weight-decay",
        "1e-4",
        "--eval-every",
        "7",
    ];
    let run = |out: &std::path::Path, steps: &str, extra: &[&str]| {
        let mut args: Vec<&str> = common.to_vec();
        args.extend_from_slice(&["--steps", steps, "--out", s(out)]);
        args.extend_from_slice(extra);
        ok(&murmur(&args))
    };
    run(&split, "30", &["--seed", "3"]);
    // Resuming takes the saved options; only --steps changes.
    ok(&murmur(&["train", "--out", s(&split), "--resume", "--steps", "50"]));
    run(&whole, "50", &["--seed", "3"]);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(split.join("checkpoint").join(file)).unwrap();
        let b = std::fs::read(whole.join("checkpoint").join(file)).unwrap();
        assert!(a == b, "{file} differs between resumed and uninterrupted runs");
    }
    let summary = read_json(&split.join("summary.json"));
    assert_eq!(summary["steps"], 50);
    assert_eq!(summary["resumed_from_step"], 30);
    // Same AdamW run for a different seed must differ (the comparison can fail).
    run(&tmp.path().join("other"), "50", &["--seed", "4"]);
    let c = std::fs::read(tmp.path().join("other/checkpoint/model.safetensors")).unwrap();
    assert!(c != std::fs::read(whole.join("checkpoint/model.safetensors")).unwrap());
}

#[test]
fn config_file_env_and_flags_layer_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        "model = \"mlp\"\nhidden = \"16\"\nsteps = 5\nbatch-size = 8\nlr = 0.01\n",
    )
    .unwrap();
    let out = tmp.path().join("run");
    ok(&murmur_env(
        &["train", "--config", s(&cfg), "--steps", "12", "--out", s(&out)],
        &[("MURMUR_BATCH_SIZE", "16")],
    ));
    let summary = read_json(&out.join("summary.json"));
    assert_eq!(summary["steps"], 12, "flag beats file");
    assert_eq!(summary["config"]["batch_size"], 16, "environment beats file");
    assert_eq!(summary["config"]["schedule"]["lr"], 0.01, "file beats default");
    assert_eq!(summary["config"]["model"]["hidden"], serde_json::json!([16]));
    for key in ["train_loss", "eval_loss", "eval_accuracy", "eval_perplexity"] {
        assert!(summary["final"].get(key).is_some(), "final.{key} missing");
    }
    assert!(summary["wall_seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_is_one_line_exit_2_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let wrong_dir = tmp.path().join("not-mnist");
    std::fs::create_dir(&wrong_dir).unwrap();
    std::fs::write(wrong_dir.join("notes.txt"), "hello").unwrap();
    let bad_toml = tmp.path().join("bad.toml");
    std::fs::write(&bad_toml, "stepz = 4\n").unwrap();
    let missing = tmp.path().join("missing");
    let wrong = format!("mnist:{}", s(&wrong_dir));
    let absent = format!("mnist:{}", s(&missing));
    let absent_text = format!("text:{}", s(&missing.join("input.txt")));
    let shakespeare = format!("text:{}", s(&data_dir().join("tinyshakespeare/input.txt")));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", "resnet9000"], "resnet9000"),
        (vec!["--data", "imagenet:/x"], "imagenet"),
        (vec!["--data", &absent], "missing"),
        (vec!["--data", &wrong], "not-mnist"),
        (vec!["--data", &absent_text], "input.txt"),
        (vec!["--steps", "0"], "--steps must be >= 1 (got 0)"),
        (vec!["--steps=-5"], "-5"),
        (vec!["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
        (vec!["--partition", "dirichlet:0", "--nodes", "4"], "dirichlet"),
        (vec!["--partition", "dirichlet:-1", "--nodes", "4"], "-1"),
        (vec!["--hidden", "64,0"], "64,0"),
        (vec!["--lr", "-0.1"], "-0.1"),
        (vec!["--holdout", "1.5"], "1.5"),
        (vec!["--config", s(&bad_toml)], "stepz"),
        (vec!["--model", "lenet", "--data", "synthetic"], "lenet"),
        (
            vec!["--model", "chargpt", "--data", &shakespeare, "--dim", "10", "--heads", "4"],
            "dim 10 with 4 heads",
        ),
    ];
    for (i, (extra, needle)) in cases.into_iter().enumerate() {
        let out_dir = tmp.path().join(format!("out{i}"));
        let mut args = vec!["train", "--out", s(&out_dir)];
        args.extend(extra.iter().copied());
        let res = murmur(&args);
        let stderr = String::from_utf8_lossy(&res.stderr);
        assert_eq!(res.status.code(), Some(2), "{extra:?}: exit {:?}, stderr {stderr}", res.status);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{extra:?}: want one line, got {stderr:?}");
        assert!(lines[0].contains(needle), "{extra:?}: {:?} does not name {needle:?}", lines[0]);
        assert!(!out_dir.exists(), "{extra:?}: left {} behind", out_dir.display());
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
}

#[test]
fn an_existing_run_is_not_overwritten_without_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    ok(&murmur(&["train", "--steps", "3", "--hidden", "8", "--out", s(&out)]));
    let before = std::fs::read(out.join("checkpoint/model.safetensors")).unwrap();
    let res = murmur(&["train", "--steps", "3", "--out", s(&out)]);
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("--resume"));
    assert_eq!(before, std::fs::read(out.join("checkpoint/model.safetensors")).unwrap());
}
