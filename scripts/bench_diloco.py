"""DiLoCo benchmarks, stdlib only:

1. Loss against bytes: chargpt on Tiny Shakespeare, 4 nodes, 1000 local
   steps per node, run by `murmur sim` (the same strategy code, every model
   in this process, in virtual time; bytes are the encoded bodies of every
   message, as the wire would carry them). H = 1 (the models averaged
   after every step: outer lr 1, no momentum) against H = 10, 50, 100 with
   blocking, eager and delayed outer steps (outer lr 0.9, momentum 0.4),
   and H = 50 blocking with bf16, int8 and top-k deltas. Held-out loss of
   the final model (the members' average) against bytes sent.
2. Eager against blocking under an injected 200 ms delay: `murmur cluster`,
   4 real processes, H = 50, 20 rounds, every node's outgoing payloads held
   back 200 ms (`delay:200ms`), against the same without it. The delay a
   blocking round pays is the baseline; the share of it eager does not pay
   is what it hides (target 80%). Round time is a node's compute plus
   communication seconds (summary.json) over its rounds, whole run.

Writes <out>/diloco.json, <out>/diloco.md and <out>/diloco.svg.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HIDE_TARGET = 0.8
STEPS = 1000
MODEL = ["--model", "chargpt", "--dim", "64", "--layers", "2", "--heads", "4", "--context", "64"]
TRAIN = ["--batch-size", "16", "--lr", "3e-3"]
OUTER = ["--outer-lr", "0.9", "--outer-momentum", "0.4"]


def text_data():
    root = Path(os.environ.get("MURMUR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "tinyshakespeare" / "input.txt"
    if not path.exists():
        sys.exit(f"bench_diloco: {path} not found; set MURMUR_DATA_DIR")
    return f"text:{path}"


def sim(args, name, h, sync="blocking", encoding="f32", outer=OUTER):
    out = Path(args.work) / name
    cmd = [args.murmur, "sim", "--strategy", "diloco", "--nodes", "4", *MODEL, "--data", text_data(), *TRAIN]
    cmd += ["--rounds", str(STEPS // h), "--local-steps", str(h), "--outer-sync", sync, "--encoding", encoding]
    cmd += [*outer, "--eval-rounds", "0", "--round-timeout-ms", "60000", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MURMUR_THREADS="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{name}: murmur sim failed: {done.stderr.strip()[-2000:]}")
    report = json.loads((out / "sim.json").read_text())
    ppl = report["final_metrics"]["averaged_model"]
    row = {
        "name": name, "h": h, "sync": sync, "encoding": encoding, "outer": " ".join(outer),
        "loss": math.log(ppl), "bytes": report["messages"]["payload_bytes"], "end": report["end"],
    }  # fmt: skip
    print(f"{name}: loss {row['loss']:.4f}, {row['bytes']:,} bytes", file=sys.stderr, flush=True)
    return row


def loss_against_bytes(args):
    rows = [sim(args, "h1", 1, outer=["--outer-lr", "1", "--outer-momentum", "0"])]
    for h in (10, 50, 100):
        for sync in ("blocking", "eager", "delayed"):
            rows.append(sim(args, f"h{h}-{sync}", h, sync))
    for enc in ("bf16", "int8", "topk:1100"):
        rows.append(sim(args, f"h50-blocking-{enc.split(':')[0]}", 50, "blocking", enc))
    return rows


def cluster(args, name, sync, delay):
    out = Path(args.work) / name
    cmd = [args.murmur, "cluster", "--nodes", "4", "--strategy", "diloco", *MODEL, "--data", text_data(), *TRAIN]
    cmd += ["--steps", str(STEPS), "--local-steps", "50", "--outer-sync", sync, *OUTER, "--round-timeout-ms", "60000"]
    cmd += ["--out", str(out)]
    if delay:
        cmd += [arg for i in range(4) for arg in ("--node-fault", f"{i}=delay:{delay}")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: murmur cluster failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    doc = json.loads((out / "cluster.json").read_text())
    rounds = [n["timing"]["compute_seconds"] + n["timing"]["communication_seconds"] for n in doc["nodes"]]
    per_round = sum(rounds) / len(rounds) / (STEPS // 50)
    comm = sum(n["timing"]["communication_seconds"] for n in doc["nodes"]) / len(doc["nodes"]) / (STEPS // 50)
    print(f"{name}: {per_round * 1000:.0f} ms per round ({comm * 1000:.0f} ms communicating)", file=sys.stderr, flush=True)
    return {"name": name, "sync": sync, "delay": delay, "round_seconds": per_round, "communication_seconds": comm}


def eager_under_delay(args):
    runs = {(s, d): cluster(args, f"{s}-{d or 'none'}", s, d) for s in ("blocking", "eager") for d in (None, "200ms")}
    paid = {s: runs[(s, "200ms")]["round_seconds"] - runs[(s, None)]["round_seconds"] for s in ("blocking", "eager")}
    hidden = 1 - paid["eager"] / paid["blocking"] if paid["blocking"] > 0 else float("nan")
    return {"runs": list(runs.values()), "delay_paid": paid, "hidden": hidden}


def svg(rows):
    w, h, pad = 640, 400, 60
    xs = [math.log10(max(r["bytes"], 1)) for r in rows]
    ys = [r["loss"] for r in rows]
    x0, x1, y0, y1 = min(xs) - 0.2, max(xs) + 0.2, min(ys) - 0.05, max(ys) + 0.05
    px = lambda x: pad + (x - x0) / (x1 - x0) * (w - 2 * pad)
    py = lambda y: h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)
    colour = {"blocking": "#1f77b4", "eager": "#2ca02c", "delayed": "#d62728"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">']
    out.append(f'<rect width="{w}" height="{h}" fill="white"/>')
    out.append(f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>')
    out.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>')
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        out.append(f'<text x="{px(e):.0f}" y="{h - pad + 16}" text-anchor="middle">1e{e}</text>')
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{pad - 6}" y="{py(y) + 4:.0f}" text-anchor="end">{y:.2f}</text>')
    out.append(f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">bytes sent (all nodes, log scale)</text>')
    out.append(f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">held-out loss</text>')
    for r, x, y in zip(rows, xs, ys):
        c = colour.get(r["sync"], "black") if r["h"] > 1 else "black"
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="4" fill="{c}"/>')
        out.append(f'<text x="{px(x) + 6:.1f}" y="{py(y) - 4:.1f}">{r["name"]}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def report(result):
    rows = result["loss_against_bytes"]
    base = next(r for r in rows if r["name"] == "h1")
    lines = ["# DiLoCo: chargpt on Tiny Shakespeare, 4 nodes x 1000 steps", "",
             "## Held-out loss against bytes (`murmur sim`)", "",
             "| run | H | outer sync | encoding | held-out loss | vs H=1 | bytes sent | bytes vs H=1 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['h']} | {r['sync']} | {r['encoding']} | {r['loss']:.4f} | "
            f"{r['loss'] / base['loss']:.3f} | {r['bytes']:,} | 1/{base['bytes'] / max(r['bytes'], 1):.0f} |"
        )
    e = result["eager_under_delay"]
    lines += ["", "## Eager against blocking, every payload delayed 200 ms (`murmur cluster`, H = 50)", "",
              "| run | ms per round | ms communicating per round |", "|---|---|---|"]  # fmt: skip
    for r in e["runs"]:
        lines.append(f"| {r['name']} | {r['round_seconds'] * 1000:.0f} | {r['communication_seconds'] * 1000:.0f} |")
    lines += ["", f"The delay costs a blocking round {e['delay_paid']['blocking'] * 1000:.0f} ms and an eager "
              f"round {e['delay_paid']['eager'] * 1000:.0f} ms: eager hides {e['hidden']:.0%} of it "
              f"(target {HIDE_TARGET:.0%}, {'met' if e['hidden'] >= HIDE_TARGET else 'MISSED'})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--murmur", default="target/release/murmur")
    p.add_argument("--out", type=Path, default=Path("target/bench"))
    p.add_argument("--skip-sim", action="store_true", help="only the delay comparison")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="murmur-bench-diloco-") as work:
        args.work = work
        result = {"steps": STEPS}
        result["loss_against_bytes"] = [] if args.skip_sim else loss_against_bytes(args)
        result["eager_under_delay"] = eager_under_delay(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diloco.json").write_text(json.dumps(result, indent=2) + "\n")
    if result["loss_against_bytes"]:
        (args.out / "diloco.svg").write_text(svg(result["loss_against_bytes"]))
        text = report(result)
    else:
        text = json.dumps(result["eager_under_delay"], indent=2)
    (args.out / "diloco.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
