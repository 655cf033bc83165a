"""Semi-decentralized training, sampled-to-sampled (S2S) against
sampled-to-all (S2A), stdlib only.

`murmur sim` (every model in this process, the same strategy and sampler
code as the real nodes and coordinator, in virtual time): 12 lenet nodes on
MNIST in 3 rings with no edge between them (`--topology rings:3`), gossip
every round, and a coordinator that samples K = 4 nodes every 5 rounds and
sends their average back to the sampled (S2S) or to all (S2A). Two data
regimes:

- iid: every node an IID shard;
- components: `--partition groups:3`, each ring holding only its own group
  of 3 or 4 classes (the heterogeneity between components that the paper's
  comparison turns on: Rodio, Neglia, Chen, Larsson, "A Unified Convergence
  Analysis for Semi-Decentralized Learning: Sampled-to-Sampled vs.
  Sampled-to-All Communication").

Each regime also runs the rings alone (gossip, no coordinator) as the
baseline. Per round: the mean of the nodes' own held-out accuracies ("mean
local accuracy") and the consensus distance sqrt(1/n sum ||x_i - x_bar||^2).

Writes <out>/semidec.json, <out>/semidec.md and <out>/semidec.svg.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

NODES, ROUNDS, LOCAL, EVERY, K = 12, 40, 10, 5, 4
TRAIN = ["--model", "lenet", "--lr", "2e-3", "--batch-size", "32"]
REGIMES = {"iid": "iid", "components": "groups:3"}
RUNS = {"rings alone": [], "S2S": ["--target", "s2s"], "S2A": ["--target", "s2a"]}


def mnist():
    root = Path(os.environ.get("MURMUR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "mnist"
    if not path.is_dir():
        sys.exit(f"bench_semidec: {path} not found; set MURMUR_DATA_DIR")
    return f"mnist:{path}"


def sim(args, regime, run):
    out = Path(args.work) / f"{regime}-{run.replace(' ', '-')}"
    strategy = ["--strategy", "gossip"] if not RUNS[run] else [
        "--strategy", "semidec", "--sample", str(K), "--sample-every", str(EVERY), *RUNS[run]]
    cmd = [args.murmur, "sim", "--nodes", str(NODES), "--topology", "rings:3", *strategy, *TRAIN,
           "--data", mnist(), "--partition", REGIMES[regime], "--rounds", str(ROUNDS),
           "--local-steps", str(LOCAL), "--eval-rounds", str(args.eval_rounds), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MURMUR_THREADS="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{regime} {run}: murmur sim failed: {done.stderr.strip()[-2000:]}")
    report = json.loads((out / "sim.json").read_text())
    rounds = [{"round": r["round"], "accuracy": r["mean_metric"], "consensus": r["consensus_distance"]}
              for r in report["rounds"]]
    final = report["final_metrics"]
    row = {"regime": regime, "run": run, "rounds": rounds,
           "mean_local_accuracy": final["mean_node"], "averaged_model_accuracy": final["averaged_model"],
           "consensus": report["final_consensus_distance"], "bytes": report["messages"]["payload_bytes"]}
    print(f"{regime} {run}: mean local accuracy {row['mean_local_accuracy']:.4f}, "
          f"consensus {row['consensus']:.4f}", file=sys.stderr, flush=True)
    return row


def polyline(points, x0, y0, w, h, xmax, ymax, colour, dash=""):
    if not points:
        return ""
    pts = " ".join(f"{x0 + w * x / xmax:.1f},{y0 + h - h * min(y, ymax) / ymax:.1f}" for x, y in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{extra} points="{pts}"/>\n'


def svg(rows):
    colours = {"rings alone": "#888888", "S2S": "#1f77b4", "S2A": "#d62728"}
    w, h, pad = 300, 180, 40
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="740" height="520" font-family="sans-serif" font-size="11">\n']
    cmax = max((p["consensus"] for r in rows for p in r["rounds"]), default=1.0) or 1.0
    for col, regime in enumerate(REGIMES):
        for line, (key, ymax, label) in enumerate([("accuracy", 1.0, "mean local accuracy"),
                                                   ("consensus", cmax, "consensus distance")]):
            x0, y0 = pad + col * (w + 2 * pad), pad + line * (h + 2 * pad)
            parts.append(f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>\n')
            parts.append(f'<text x="{x0}" y="{y0 - 8}">{regime}: {label} by round (max {ymax:.3g})</text>\n')
            for r in (r for r in rows if r["regime"] == regime):
                pts = [(p["round"], p[key]) for p in r["rounds"] if p[key] is not None]
                parts.append(polyline(pts, x0, y0, w, h, ROUNDS, ymax, colours[r["run"]]))
    for i, (run, c) in enumerate(colours.items()):
        parts.append(f'<text x="{pad + i * 120}" y="505" fill="{c}">{run}</text>\n')
    parts.append("</svg>\n")
    return "".join(parts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--murmur", default="target/release/murmur")
    p.add_argument("--out", default="target/bench")
    p.add_argument("--eval-rounds", type=int, default=5)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        rows = [sim(args, regime, run) for regime in REGIMES for run in RUNS]
    (out / "semidec.json").write_text(json.dumps({"nodes": NODES, "rounds": ROUNDS, "local_steps": LOCAL,
                                                  "sample": K, "sample_every": EVERY, "runs": rows}, indent=2))
    (out / "semidec.svg").write_text(svg(rows))
    lines = [
        f"# Semi-decentralized: S2S against S2A ({NODES} lenet nodes, MNIST, rings:3, "
        f"K = {K} every {EVERY} rounds, {ROUNDS} rounds x {LOCAL} local steps, `murmur sim`)",
        "",
        "| data | run | mean local accuracy | accuracy of the nodes' average | consensus distance | bytes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['run']} | {r['mean_local_accuracy']:.4f} | "
                     f"{r['averaged_model_accuracy']:.4f} | {r['consensus']:.4f} | {r['bytes']:,} |")
    lines += ["", f"Mean local accuracy at the evaluated rounds (every {args.eval_rounds}th: with "
              f"--eval-rounds {EVERY} those are the sampling rounds, just after the average):", ""]
    for r in rows:
        series = ", ".join(f"{p['round']}: {p['accuracy']:.3f}" for p in r["rounds"] if p["accuracy"] is not None)
        lines.append(f"- {r['regime']} {r['run']}: {series}")
    lines += ["", "Consensus distance at every round:", ""]
    for r in rows:
        lines.append(f"- {r['regime']} {r['run']}: " + " ".join(f"{p['consensus']:.2f}" for p in r["rounds"]))
    (out / "semidec.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
