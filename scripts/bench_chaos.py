"""The shipped chaos scenarios at a larger size, each against its baseline.

`make test` runs every scenario in deploy/scenarios/ at its small size (the
synthetic data, a small MLP). Here each runs with `murmur chaos --baseline`
(the same cluster without the events, in the same invocation) on MNIST
with lenet, the same timeline and steps, so the model is a real one
(about 3.5 minutes a scenario here):

    --set model=lenet --set data=mnist:DIR --set lr=0.002 --set batch-size=32

(the byzantine scenarios are on MNIST lenet already: only their data path).
Per scenario: the held-out accuracy of the average of the finished nodes'
final models against the baseline's, the nodes that finished, wall time of
both runs, and whether the scenario's own [expect] held.

The disaster study (disaster-hubs, disaster-leaves, disaster-relays: a
Barabasi-Albert tree losing its 2 hubs, 2 leaves, or its 2 hubs when they
hold no data) runs as one comparison per seed (`murmur chaos A B C
--baseline --set seed=S`), at the same MNIST size, over SEEDS seeds: the
mean and range of each arm's accuracy (the average model, and each node's
own model) and consensus distance, since one run of one arm is noisy.

Writes <out>/chaos.json and <out>/chaos.md (and each run's report under
<out>/chaos/<scenario>/, the study's under <out>/chaos/disaster-seed-S/).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mnist():
    root = Path(os.environ.get("MURMUR_DATA_DIR", ROOT.parent / "shared" / "data"))
    path = root / "mnist"
    if not path.is_dir():
        sys.exit(f"bench_chaos: {path} not found; set MURMUR_DATA_DIR")
    return str(path)


def overrides(path):
    cluster = tomllib.loads(path.read_text()).get("cluster", {})
    sets = [f"data=mnist:{mnist()}"]
    if cluster.get("model") != "lenet":
        sets += ["model=lenet", "optimizer=adamw", "lr=0.002", "batch-size=32"]
    return [a for s in sets for a in ("--set", s)]


def netns_unavailable(path):
    """Why a netns scenario cannot run here (None when it can, or is not one)."""
    if not tomllib.loads(path.read_text()).get("netns"):
        return None
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    missing = [t for t in ("ip", "tc", "nft") if not shutil.which(t)]
    return f"{', '.join(missing)} not found (scripts/setup-netns.sh installs them)" if missing else None


def run(args, path):
    why = netns_unavailable(path)
    if why:
        print(f"{path.stem}: skipped: {why}", file=sys.stderr, flush=True)
        return {"scenario": path.stem, "skipped": why}
    out = Path(args.out) / "chaos" / path.stem
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [args.murmur, "chaos", str(path), "--baseline", "--out", str(out), *overrides(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MURMUR_THREADS="1"))
    report_path = out / "report.json"
    if not report_path.exists():
        raise RuntimeError(f"{path.name}: murmur chaos wrote no report: {done.stderr.strip()[-2000:]}")
    r = json.loads(report_path.read_text())
    row = {
        "scenario": path.stem,
        "accuracy": r["result"]["eval_accuracy"],
        "baseline_accuracy": (r["baseline"] or {}).get("eval_accuracy"),
        "finished": r["result"]["finished"],
        "nodes": r["nodes"],
        "wall_seconds": r["result"]["wall_seconds"],
        "baseline_wall_seconds": (r["baseline"] or {}).get("wall_seconds"),
        "expectations": r["expectations"],
        "held": all(e["held"] is not False for e in r["expectations"]),
        "exit": done.returncode,
    }
    pct = lambda a: "-" if a is None else f"{100 * a:.2f}%"
    print(f"{path.stem}: {pct(row['accuracy'])} against {pct(row['baseline_accuracy'])}, "
          f"{row['finished']}/{row['nodes']} finished, expectations held: {row['held']}", file=sys.stderr, flush=True)
    return row


SEEDS = [1, 2, 3]
ARMS = ["disaster-hubs", "disaster-leaves", "disaster-relays"]


def disaster(args):
    """The study's three arms side by side, once per seed."""
    paths = [Path(args.scenarios) / f"{a}.toml" for a in ARMS]
    per_seed = []
    for seed in SEEDS:
        out = Path(args.out) / "chaos" / f"disaster-seed-{seed}"
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [args.murmur, "chaos", *map(str, paths), "--baseline", "--out", str(out),
               "--set", f"seed={seed}", *overrides(paths[0])]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MURMUR_THREADS="1"))
        path = out / "comparison.json"
        if not path.exists():
            raise RuntimeError(f"disaster seed {seed}: no comparison: {done.stderr.strip()[-2000:]}")
        rows = {r["scenario"]: r for r in json.loads(path.read_text())}
        per_seed.append({"seed": seed, "arms": rows})
        print(f"disaster seed {seed}: " + ", ".join(
            f"{a}: {100 * (rows[a]['result']['eval_accuracy'] or 0):.2f}%" for a in ARMS), file=sys.stderr, flush=True)
    summary = {}
    for a in ARMS:
        def values(key, part="result"):
            return [s["arms"][a][part][key] for s in per_seed if (s["arms"][a].get(part) or {}).get(key) is not None]
        summary[a] = {k: values(k) for k in ("eval_accuracy", "node_mean_accuracy", "node_worst_accuracy", "consensus_distance")}
        summary[a]["baseline_accuracy"] = values("eval_accuracy", "baseline")
    return {"seeds": SEEDS, "per_seed": per_seed, "summary": summary}


def disaster_report(study):
    def cell(vals, pct=True):
        if not vals:
            return "-"
        f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.2f}")
        mean = sum(vals) / len(vals)
        return f"{f(mean)} ({f(min(vals))}-{f(max(vals))})"
    lines = [
        "",
        f"## The disaster study ({len(study['seeds'])} seeds: mean (range))",
        "",
        "| arm | average model | nodes: mean | nodes: worst | consensus distance | no events (average model) |",
        "|---|---|---|---|---|---|",
    ]
    for a, s in study["summary"].items():
        lines.append(f"| {a} | {cell(s['eval_accuracy'])} | {cell(s['node_mean_accuracy'])} "
                     f"| {cell(s['node_worst_accuracy'])} | {cell(s['consensus_distance'], False)} "
                     f"| {cell(s['baseline_accuracy'])} |")
    return "\n".join(lines) + "\n"


def report(rows):
    pct = lambda a: "-" if a is None else f"{100 * a:.2f}%"
    lines = [
        "# Chaos scenarios at bench size",
        "",
        "Each shipped scenario on MNIST with lenet (its test's timeline and steps), against the same "
        "cluster without the events in the same invocation (`murmur chaos --baseline`).",
        "",
        "| scenario | accuracy | baseline | difference | finished | wall (baseline) | expectations |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['scenario']} | skipped: {r['skipped']} | | | | | |")
            continue
        diff = "-" if None in (r["accuracy"], r["baseline_accuracy"]) else f"{100 * (r['accuracy'] - r['baseline_accuracy']):+.2f}"
        lines.append(
            f"| {r['scenario']} | {pct(r['accuracy'])} | {pct(r['baseline_accuracy'])} | {diff} "
            f"| {r['finished']}/{r['nodes']} | {r['wall_seconds']:.0f} s ({(r['baseline_wall_seconds'] or 0):.0f} s) "
            f"| {'held' if r['held'] else 'NOT MET'} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--murmur", default="target/release/murmur")
    ap.add_argument("--out", default="target/bench")
    ap.add_argument("--scenarios", default=str(ROOT / "deploy" / "scenarios"))
    args = ap.parse_args()
    scenarios = sorted(p for p in Path(args.scenarios).glob("*.toml") if p.stem not in ARMS)
    rows = [run(args, p) for p in scenarios]
    study = disaster(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps({"rows": rows, "disaster": study}, indent=1))
    text = report(rows) + disaster_report(study)
    (out / "chaos.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
