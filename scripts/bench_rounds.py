"""Wall time per round of an 8-node gossip ring, split into compute and communication.

`murmur cluster --nodes 8 --strategy gossip --topology ring` on the synthetic
data (32 features, 10 classes) with an mlp of two equal hidden layers, sized
to about 100k and about 5M parameters (h*h + 44h + 10 for width h; the count
is checked against node-0's summary.json). Every node runs one libtorch
thread (the cluster sets it), trains --local-steps steps of batch 64 per
round (default 20) and evaluates only at the end, so evaluations stay out of
the timing.

Per node, cluster.json gives `timing`: compute is the time inside local
phases, communication the time from the end of one local phase to the start
of the next (sending, waiting for both ring neighbours, mixing). Both are
divided by the rounds and averaged over the nodes; start-up (joining) and the
final evaluation are in neither.

The 8 nodes share the machine's cores, so a node's communication time is
partly transfer and mixing and partly waiting while its neighbours, slowed by
the same sharing, finish their local phase. Each size therefore runs three
times:

- f32: the measurement;
- bf16: half the bytes on the wire; the communication time it saves is what
  the bytes themselves cost;
- local: the same cluster with `--comm late:1` (only the last round
  communicates), i.e. the same local phases under the same CPU sharing. Its
  round is its whole loop (local phases, then waiting for the slowest node
  and one exchange at the end) divided by the rounds. A round of f32 minus a
  round of local is what communicating really adds to the round (slightly
  understated, by the one exchange local still makes); the rest of the
  communication time is waiting on a busy CPU, time the neighbours used to
  compute. The CPU seconds of all processes (f32 minus local) give the CPU
  that sending, receiving and mixing take;
- overlap: f32 with `--overlap` (the trainer runs the next local phase
  while the exchange runs, CoCoD-SGD): what is left between phases when
  the node does not wait for its neighbours. Each run also reports the
  averaged model's held-out accuracy, so that a faster round that learns
  less shows.

With --python (a python with torch, the bench venv's), the same blocking
ring written by hand on gloo (`gloo_ring.py`: the same model, batch, local
steps, AdamW settings and rounds, 8 processes, one torch thread each) runs
too, as a reference for what this algorithm's communication costs on this
machine when it is not murmur's: its ranks wait for their neighbours on the
same shared cores.

When <out>/transfer.json exists (scripts/bench_transfer.py), the time to
receive two payloads of each size at its measured murmur throughput on an
idle pair is given as a reference. The machine's effective cores (nproc spin
loops at once against one) are measured first, since other work on the
machine moves every number here.

Writes <out>/rounds.json and <out>/rounds.md and prints the report; the
clusters' directories and node logs stay in <out>/rounds/.
"""

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gloo_ring

NODES = 8
COMM_TARGET = 0.10  # communication's share of a round, 100k model
# name, --hidden, the parameter count aimed at, rounds (chosen so the whole
# bench takes about two and a half minutes on 2 cores).
SIZES = [("100k", "295,295", 100_000, 40), ("5M", "2214,2214", 5_000_000, 3)]
RUNS = {
    "f32": ["--encoding", "f32"],
    "bf16": ["--encoding", "bf16"],
    "local": ["--comm", "late:1"],
    "overlap": ["--encoding", "f32", "--overlap"],
}
BYTES_PER_VALUE = {"f32": 4, "bf16": 2, "local": 4, "overlap": 4}
TIMEOUT_S = 600


def spin(_=None):
    start = time.perf_counter()
    x = 0
    for i in range(4_000_000):
        x += i
    return time.perf_counter() - start


def effective_cores():
    """nproc spin loops at once against one alone: about nproc on an idle machine."""
    alone = min(spin() for _ in range(2))
    n = os.cpu_count()
    with multiprocessing.Pool(n) as pool:
        together = max(pool.map(spin, range(n)))
    return n * alone / together


def run_cluster(args, name, hidden, rounds, run):
    """Runs one cluster; returns its directory, wall seconds and the CPU seconds of all its processes."""
    out = args.out / "rounds" / f"{name}-{run}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [args.murmur, "cluster", "--nodes", str(NODES), "--strategy", "gossip", "--topology", "ring"]
    cmd += ["--data", "synthetic", "--model", "mlp", "--hidden", hidden, "--local-steps", str(args.local_steps)]
    cmd += ["--rounds", str(rounds), "--eval-every", "0", *RUNS[run], "--out", str(out)]
    print(f"bench: {name} {run}: murmur {' '.join(cmd[1:])}", file=sys.stderr)
    # The nodes are the cluster's children and it waits for them, so their
    # CPU time is in this process's RUSAGE_CHILDREN once the cluster exits.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-12:])
        raise RuntimeError(f"{name} {run}: murmur cluster failed ({done.returncode}):\n{tail}\n{done.stderr.strip()}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return out, wall, cpu


def measure(args, name, hidden, target, rounds, run):
    out, wall, cpu = run_cluster(args, name, hidden, rounds, run)
    cluster = json.loads((out / "cluster.json").read_text())
    summaries = [json.loads((out / f"node-{n['index']}" / "summary.json").read_text()) for n in cluster["nodes"]]
    params = check_parameters(name, f"--hidden {hidden} gives", summaries[0]["parameters"], target)
    for n in cluster["nodes"]:
        if n["exit_status"] != 0 or n["rounds"] != rounds:
            raise RuntimeError(f"{name} {run}: node {n['index']} exited {n['exit_status']} after {n['rounds']} of {rounds} rounds")

    compute = [n["timing"]["compute_seconds"] / rounds for n in cluster["nodes"]]
    comm = [n["timing"]["communication_seconds"] / rounds for n in cluster["nodes"]]
    mean = statistics.fmean
    return {
        "size": name,
        "run": run,
        "hidden": hidden,
        "parameters": params,
        "rounds": rounds,
        "communicating_rounds": 1 if run == "local" else rounds,
        "average_accuracy": cluster["average"]["eval_accuracy"],
        **per_round(compute, comm),
        "bytes_sent_per_round_per_node": mean(s["bytes"]["bytes_sent"] / rounds for s in summaries),
        "theoretical_bytes_per_round_per_node": 2 * params * BYTES_PER_VALUE[run],
        "send_failures": sum(s["send_failures"] for s in summaries),
        "refusals": sum(sum(s["refusals"].values()) for s in summaries),
        "strategy_drops": sum(sum(s["strategy_drops"].values()) for s in summaries),
        "cluster_wall_seconds": wall,
        "cpu_seconds": cpu,
        "node_timing": [n["timing"] for n in cluster["nodes"]],
        "dir": str(out),
    }


def measure_gloo(args, name, hidden, target, rounds):
    """The gloo script's blocking ring at the same settings (murmur's defaults: AdamW lr 1e-3, weight decay 0.01)."""
    worker = ["--task", f"mlp-synthetic:{hidden}", "--optimizer", "adamw:0.001,0.01", "--rounds", str(rounds),
              "--local-steps", str(args.local_steps), "--batch", "64"]
    print(f"bench: {name} gloo: {args.python} gloo_ring.py {' '.join(worker)}", file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ranks = gloo_ring.finish(gloo_ring.start(args.python, NODES, worker, env=env), TIMEOUT_S)
    params = check_parameters(name, "the gloo script's mlp has", ranks[0]["parameters"], target)
    compute = [statistics.fmean(r["compute"]) for r in ranks]
    comm = [statistics.fmean(r["comm"]) for r in ranks]
    return {
        "size": name,
        "run": "gloo",
        "hidden": hidden,
        "parameters": params,
        "rounds": rounds,
        **per_round(compute, comm),
        "theoretical_bytes_per_round_per_node": 2 * params * BYTES_PER_VALUE["f32"],
    }


def check_parameters(name, what, params, target):
    """`params`, if it is within 1% of `target`; `what` says whose count it is."""
    if abs(params - target) > 0.01 * target:
        raise RuntimeError(f"{name}: {what} {params} parameters, not about {target}")
    return params


def per_round(compute, comm):
    """A round's timing from each node's (or rank's) compute and communication seconds per round."""
    mean = statistics.fmean
    return {
        "round_seconds": mean(compute) + mean(comm),
        "compute_seconds_per_round": mean(compute),
        "communication_seconds_per_round": mean(comm),
        "communication_fraction": mean(m / (c + m) for c, m in zip(compute, comm)),
        "communication_seconds_per_round_min_max": [min(comm), max(comm)],
        "compute_seconds_per_round_min_max": [min(compute), max(compute)],
    }


def split(runs, transfer):
    """Where one size's communication time goes, from its f32, bf16 and local runs."""
    f32, bf16, local = runs.get("f32"), runs.get("bf16"), runs.get("local")
    out = {"communication_seconds_per_round": f32["communication_seconds_per_round"]}
    if bf16:
        out["bf16_saves_seconds_per_round"] = f32["communication_seconds_per_round"] - bf16["communication_seconds_per_round"]
    if local:
        added = f32["round_seconds"] - local["round_seconds"]
        out["local_round_seconds"] = local["round_seconds"]
        out["added_to_round_seconds"] = added
        out["added_fraction_of_round"] = added / f32["round_seconds"]
        out["waiting_on_busy_cpu_seconds_per_round"] = f32["communication_seconds_per_round"] - added
        # local communicates once; both runs pay the same start-up and final evaluation.
        extra = (f32["cpu_seconds"] - local["cpu_seconds"]) / (f32["rounds"] - 1)
        out["communication_cpu_seconds_per_round_per_node"] = extra / NODES
    rate = transfer.get("murmur-f32")
    if rate:
        # Two payloads in, one after the other, on an idle pair.
        out["transfer_bench_seconds_per_round"] = 2 * f32["parameters"] / rate
    return out


def transfer_reference(path):
    """murmur's measured params/s per encoding from bench_transfer.py, if it ran."""
    try:
        modes = json.loads(path.read_text())["modes"]
        return {k: v["params_per_s_median"] for k, v in modes.items() if k.startswith("murmur-")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def ms(v):
    return f"{v * 1e3:,.1f}"


def report(result):
    m = result["machine"]
    lines = [
        f"# Round time, {NODES}-node gossip ring",
        "",
        f"`murmur cluster --nodes {NODES} --strategy gossip --topology ring --data synthetic --model mlp`, "
        f"{result['local_steps']} local steps of batch 64 per round, one libtorch thread per node, "
        f"{m['nproc']} cores ({m['effective_cores']:.1f} effective at the start, load average "
        f"{m['load_average_at_start']:.1f}). Per round, means over the nodes; `local` is the same cluster "
        "with `--comm late:1` (only the last round communicates).",
        "",
        "| model | params | run | rounds | round ms | compute ms | comm ms | comm % | comm ms, min-max node | "
        "KB sent / node | theory KB (2 x params x bytes) | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lo, hi = r["communication_seconds_per_round_min_max"]
        sent = r.get("bytes_sent_per_round_per_node")
        accuracy = r.get("average_accuracy")
        lines.append(
            f"| {r['size']} | {r['parameters']:,} | {r['run']} | {r['rounds']} | {ms(r['round_seconds'])} | "
            f"{ms(r['compute_seconds_per_round'])} | {ms(r['communication_seconds_per_round'])} | "
            f"{100 * r['communication_fraction']:.1f} | {ms(lo)}-{ms(hi)} | "
            f"{'n/a' if sent is None else f'{sent / 1e3:,.0f}'} | {r['theoretical_bytes_per_round_per_node'] / 1e3:,.0f} | "
            f"{'n/a' if accuracy is None else f'{100 * accuracy:.1f}%'} |"
        )
    lines += ["", *paragraphs(result)]
    goal = result["target"]
    head = f"Target: communication <= {100 * goal['target']:.0f}% of the round for the 100k model (f32)"
    if goal["value"] is None:
        lines.append(f"{head}: not measured in this run.")
    else:
        lines.append(f"{head}: {100 * goal['value']:.1f}%, {'met' if goal['met'] else 'missed'}.")
    if goal.get("overlap_value") is not None:
        v = goal["overlap_value"]
        lines.append(
            f"With --overlap (the next phase trains while the exchange runs): {100 * v:.1f}%, "
            f"{'within' if v <= goal['target'] else 'over'} the target."
        )
    reference = goal.get("gloo")
    if reference:
        lines.append(
            f"The same blocking ring hand-written on gloo, same settings, in this invocation (a reference for what "
            f"the algorithm costs on these cores, not a target): {100 * reference['fraction']:.1f}%, "
            f"{ms(reference['seconds'])} ms of communication a round against murmur's {ms(reference['murmur_seconds'])} "
            f"({reference['murmur_seconds'] / reference['seconds']:.2f}x), "
            f"its compute {ms(reference['compute_seconds'])} ms against murmur's {ms(reference['murmur_compute_seconds'])}."
        )
    return "\n".join(lines) + "\n"


def paragraphs(result):
    out = []
    for size, s in result["split"].items():
        f32 = next(r for r in result["runs"] if r["size"] == size and r["run"] == "f32")
        text = (
            f"{size} ({f32['parameters']:,} parameters): a round takes {ms(f32['round_seconds'])} ms, "
            f"{ms(f32['compute_seconds_per_round'])} ms compute and {ms(f32['communication_seconds_per_round'])} ms "
            f"communication ({100 * f32['communication_fraction']:.1f}%); each node sends "
            f"{f32['bytes_sent_per_round_per_node'] / 1e6:.2f} MB per round "
            f"(theory {f32['theoretical_bytes_per_round_per_node'] / 1e6:.2f} MB)."
        )
        if "added_to_round_seconds" in s:
            added = s["added_to_round_seconds"]
            cpu = ms(s["communication_cpu_seconds_per_round_per_node"])
            text += f" Without communication (local) a round takes {ms(s['local_round_seconds'])} ms, so "
            if added > 0:
                text += (
                    f"communicating adds {ms(added)} ms to the round ({100 * s['added_fraction_of_round']:.1f}%; "
                    f"sending, receiving and mixing take {cpu} ms of CPU per node) and the other "
                    f"{ms(s['waiting_on_busy_cpu_seconds_per_round'])} ms of communication time are waiting for "
                    "neighbours while the shared cores run their local steps."
                )
            else:
                text += (
                    f"communicating adds nothing measurable (the difference, {ms(added)} ms, is noise; sending, "
                    f"receiving and mixing take {cpu} ms of CPU per node): the communication time is waiting for "
                    "neighbours while the shared cores run their local steps."
                )
        if "bf16_saves_seconds_per_round" in s:
            text += f" bf16 (half the bytes) changes communication by {ms(-s['bf16_saves_seconds_per_round'])} ms."
        if "transfer_bench_seconds_per_round" in s:
            text += (
                f" At the throughput of bench_transfer.py, receiving the two f32 payloads takes "
                f"{ms(s['transfer_bench_seconds_per_round'])} ms."
            )
        out += [text, ""]
    return out


def main():
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--murmur", default=str(repo / "target/release/murmur"), help="the murmur binary")
    p.add_argument("--out", type=Path, default=repo / "target/bench", help="where rounds.json and rounds.md go")
    p.add_argument("--local-steps", type=int, default=20, help="local steps per round (default 20)")
    p.add_argument("--sizes", default="100k,5M", help="comma-separated subset of 100k,5M")
    p.add_argument("--runs", default="f32,bf16,local,overlap", help="comma-separated subset of f32,bf16,local,overlap")
    p.add_argument("--python", help="a python with torch 2.13.0 (the bench venv's): also run the gloo script")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every round count (e.g. 0.5 for a quick run)")
    args = p.parse_args()
    sizes, runs = args.sizes.split(","), args.runs.split(",")
    for bad in [s for s in sizes if s not in {n for n, *_ in SIZES}] + [r for r in runs if r not in RUNS]:
        p.error(f"unknown size or run {bad!r}; sizes are 100k,5M and runs f32,bf16,local,overlap")
    if "f32" not in runs:
        p.error("--runs needs f32: the other runs are compared with it")

    transfer = transfer_reference(args.out / "transfer.json")
    result = {
        "nodes": NODES,
        "local_steps": args.local_steps,
        "threads_per_node": 1,
        "machine": {
            "nproc": os.cpu_count(),
            "effective_cores": effective_cores(),
            "load_average_at_start": os.getloadavg()[0],
        },
        "transfer_reference_params_per_s": transfer or None,
        "runs": [],
        "split": {},
    }
    for name, hidden, target, rounds in SIZES:
        if name not in sizes:
            continue
        done = {}
        for run in runs:
            done[run] = measure(args, name, hidden, target, max(2, round(rounds * args.scale)), run)
            result["runs"].append(done[run])
        result["split"][name] = split(done, transfer)
        if args.python:
            result["runs"].append(measure_gloo(args, name, hidden, target, max(2, round(rounds * args.scale))))
    small = next((r for r in result["runs"] if r["size"] == "100k" and r["run"] == "f32"), None)
    value = small and small["communication_fraction"]
    result["target"] = {"value": value, "target": COMM_TARGET, "met": value is not None and value <= COMM_TARGET}
    overlap = next((r for r in result["runs"] if r["size"] == "100k" and r["run"] == "overlap"), None)
    result["target"]["overlap_value"] = overlap and overlap["communication_fraction"]
    reference = next((r for r in result["runs"] if r["size"] == "100k" and r["run"] == "gloo"), None)
    if small and reference:
        result["target"]["gloo"] = {
            "fraction": reference["communication_fraction"],
            "seconds": reference["communication_seconds_per_round"],
            "compute_seconds": reference["compute_seconds_per_round"],
            "murmur_seconds": small["communication_seconds_per_round"],
            "murmur_compute_seconds": small["compute_seconds_per_round"],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rounds.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (args.out / "rounds.md").write_text(text)
    print(text)
    print(f"bench: wrote {args.out / 'rounds.json'} and {args.out / 'rounds.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
