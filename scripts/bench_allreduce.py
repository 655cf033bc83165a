"""All-reduce of a 25 MB vector (6,250,000 float32 values) over N processes
on 127.0.0.1: murmur's shard-owner all-reduce (the one DiLoCo and merge use,
over the real Network: TCP + TLS 1.3 + Yamux) against PyTorch gloo's
`all_reduce` of the same size and process count, in one run.

Modes, each run with --ranks 4 and 8:
- murmur-f32, murmur-bf16: N `murmur bench-allreduce` processes; shards and
  results travel as f32 or bf16 (the mean is taken in f32 either way);
- gloo: N Python processes, `torch.distributed` with the gloo backend,
  `dist.all_reduce` of one float32 tensor (then divided by N, as a mean).

Every rank times each all-reduce from its start on that rank to its result;
one untimed warm-up comes first. A run's figure is the median over its
all-reduces of the mean over ranks; modes alternate --runs times and the
median run counts. Speed is values reduced per second (elements / seconds),
so bf16 is compared with gloo's float32 at the same parameter count.
Targets: murmur-f32 >= 0.5x gloo, murmur-bf16 >= 1.0x gloo. Writes
<out>/allreduce.json and <out>/allreduce.md and prints the report.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gloo_ring import free_port

F32_TARGET = 0.5
BF16_TARGET = 1.0
TIMEOUT_S = 600
MODES = ("murmur-f32", "murmur-bf16", "gloo")


def collect(procs):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            if p.returncode != 0:
                raise RuntimeError(f"rank failed ({p.returncode}): {err.strip()[-2000:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(line) for out in outs for line in out.splitlines() if line.strip().startswith("{")]


def murmur_run(args, ranks, encoding):
    common = [args.murmur, "bench-allreduce", "--ranks", str(ranks), "--elements", str(args.elements)]
    common += ["--repeat", str(args.repeat), "--encoding", encoding, "--threads", "1"]
    env = dict(os.environ, MURMUR_THREADS="1")
    first = subprocess.Popen([*common, "--rank", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = first.stdout.readline()
    if not line:
        first.kill()
        raise RuntimeError(f"rank 0 did not start: {first.stderr.read().strip()[-2000:]}")
    addr = json.loads(line)
    others = [
        subprocess.Popen([*common, "--rank", str(r), "--peer", addr], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for r in range(1, ranks)
    ]  # fmt: skip
    return collect([first, *others])


def gloo_run(args, ranks):
    port = str(free_port())
    worker = [sys.executable, __file__, "--elements", str(args.elements), "--repeat", str(args.repeat)]
    procs = [
        subprocess.Popen([*worker, "--gloo-worker", str(r), str(ranks), port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(ranks)
    ]  # fmt: skip
    return collect(procs)


def gloo_worker(rank, ranks, port, elements, repeat):
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    base = torch.sin(torch.arange(elements, dtype=torch.float32).remainder_(65521) * 0.013 + rank)
    tensor = base.clone()
    dist.all_reduce(tensor)  # warm-up
    for index in range(repeat):
        tensor.copy_(base)
        started = time.perf_counter()
        dist.all_reduce(tensor)
        tensor.div_(ranks)
        secs = time.perf_counter() - started
        print(json.dumps({"rank": rank, "ranks": ranks, "index": index, "elements": elements, "seconds": secs}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def figure(records):
    """Median over all-reduces of the mean over ranks."""
    by_index = {}
    for r in records:
        by_index.setdefault(r["index"], []).append(r["seconds"])
    return statistics.median(statistics.mean(v) for v in by_index.values())


def run_mode(args, mode, ranks):
    if mode == "gloo":
        return figure(gloo_run(args, ranks)), None
    records = murmur_run(args, ranks, mode.split("-")[1])
    sent = statistics.median(r["bytes_sent"] for r in records)
    return figure(records), sent


def report(result):
    lines = [
        f"# All-reduce of {result['elements']:,} float32 values ({result['elements'] * 4 / 1e6:.0f} MB), 127.0.0.1",
        "",
        "| ranks | mode | seconds | M values/s | vs gloo | target | bytes sent per rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for ranks, modes in result["ranks"].items():
        for mode, m in modes.items():
            target = {"murmur-f32": F32_TARGET, "murmur-bf16": BF16_TARGET}.get(mode)
            ratio = m.get("vs_gloo")
            met = "" if target is None else (f"{target}x {'met' if ratio >= target else 'MISSED'}")
            sent = "" if m.get("bytes_sent") is None else f"{m['bytes_sent']:,.0f}"
            lines.append(
                f"| {ranks} | {mode} | {m['seconds']:.3f} | {m['values_per_s'] / 1e6:.1f} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {met} | {sent} |"
            )
    lines += ["", f"Runs per mode: {result['runs']} (median run), {result['repeat']} timed all-reduces per run."]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--murmur", default="target/release/murmur")
    p.add_argument("--out", type=Path, default=Path("target/bench"))
    p.add_argument("--elements", type=int, default=6_250_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ranks", default="4,8")
    p.add_argument("--gloo-worker", nargs=3, metavar=("RANK", "RANKS", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gloo_worker:
        rank, ranks, port = args.gloo_worker
        gloo_worker(int(rank), int(ranks), port, args.elements, args.repeat)
        return
    result = {"elements": args.elements, "repeat": args.repeat, "runs": args.runs, "ranks": {}}
    for ranks in [int(r) for r in args.ranks.split(",")]:
        runs = {m: [] for m in MODES}
        sent = {m: [] for m in MODES}
        for _ in range(args.runs):
            for mode in MODES:
                secs, bytes_sent = run_mode(args, mode, ranks)
                runs[mode].append(secs)
                sent[mode].append(bytes_sent)
                print(f"ranks {ranks} {mode}: {secs:.3f} s", file=sys.stderr, flush=True)
        modes = {}
        for mode in MODES:
            secs = statistics.median(runs[mode])
            modes[mode] = {"seconds": secs, "values_per_s": args.elements / secs, "all_runs": runs[mode]}
            if sent[mode][0] is not None:
                modes[mode]["bytes_sent"] = statistics.median(sent[mode])
        for mode in ("murmur-f32", "murmur-bf16"):
            modes[mode]["vs_gloo"] = modes["gloo"]["seconds"] / modes[mode]["seconds"]
        result["ranks"][str(ranks)] = modes
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "allreduce.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (args.out / "allreduce.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
