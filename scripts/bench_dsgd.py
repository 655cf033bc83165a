"""Decentralized SGD: `murmur cluster` against the same algorithm written by hand on gloo.

Both sides: 8 processes on this machine, one torch thread each, a ring
(Metropolis-Hastings weights, 1/3 each), murmur's `lenet` (117,066
parameters) on MNIST (the 10,000 images of `MURMUR_DATA_DIR/mnist`, 2,000
held out, 1,000 per node, IID), SGD lr 0.01 momentum 0.9, batch 32, 10 local
steps then one gossip step per round, 100 rounds. The gloo side
(`gloo_ring.py`) is the script a researcher would write: `torch.distributed`
with the gloo backend, each round `isend`/`irecv` of the flattened
parameters with both ring neighbours, then the average.

Per side: compute and communication per round (compute: the local steps;
communication: from the end of the local steps to the next round's start,
sending, receiving and averaging), the round, peak RSS per process (the
largest process), held-out accuracy of the average model, and wall time from
launch to the last exit. The ratios (murmur / gloo) are what the performance
issue's targets are about: communication at most 1.0x, the whole round at
most 0.9x, peak RSS at most 0.35x. Peak PSS per process (sampled every 2
s) is reported beside it: RSS counts the pages of libtorch that all
processes share once per process, PSS splits them.

Then the same murmur cluster with `--overlap` (skip it with --no-overlap):
the next local phase trains while the exchange runs (CoCoD-SGD), another
algorithm than the gloo script's, so its figures stand beside the table
rather than against its targets.

Then (--many-nodes, 64 by default) a 20-round gossip run of that many lenet
nodes on this machine: how many finished, wall time, the largest node's peak
RSS, the machine's memory in use at its peak, the sum of the nodes' PSS.

Run by `make bench` with the bench venv's python (torch 2.13.0) as
--python. Writes <out>/dsgd.json and <out>/dsgd.md.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import gloo_ring

NODES, ROUNDS, LOCAL, BATCH, LR, MOMENTUM = 8, 100, 10, 32, 0.01, 0.9
TIMEOUT_S = 900


def mnist_dir():
    root = Path(os.environ.get("MURMUR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = root / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        sys.exit(f"bench_dsgd: MNIST not found in {path}; set MURMUR_DATA_DIR")
    return path


def children(pid):
    """Pids whose parent is `pid`."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def pss_bytes(pid):
    """Proportional set size of `pid` (shared pages split among their users), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class PssSampler:
    """Samples the PSS of the processes `pids()` names, every `every` seconds, in a thread: what N
    processes really take of the machine's memory (RSS counts libtorch's shared pages once per
    process). Keeps each process's largest sample, and the machine's largest use of memory
    (MemTotal - MemAvailable). Reading a process's smaps costs the kernel a walk of its page
    tables (a few ms), so the interval is long enough to stay out of the measurement."""

    def __init__(self, pids, every=2.0):
        self.pids, self.every, self.peak, self.stop = pids, every, {}, threading.Event()
        self.machine_peak = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.wait(self.every):
            self.machine_peak = max(self.machine_peak, machine_used_bytes())
            for pid in self.pids():
                b = pss_bytes(pid)
                if b is not None:
                    self.peak[pid] = max(b, self.peak.get(pid, 0))

    def finish(self):
        """The largest process's peak PSS."""
        self.stop.set()
        self.thread.join()
        return max(self.peak.values(), default=None)


def machine_used_bytes():
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = lambda k: int(info[k].split()[0]) * 1024
    return kb("MemTotal") - kb("MemAvailable")


def many_nodes(args, mnist):
    """`murmur cluster` with --many-nodes lenet nodes, a 20-round gossip run: does it finish on
    this machine, and what does it take of it."""
    n, rounds = args.many_nodes, 20
    out = Path(args.out) / "dsgd" / f"murmur-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [args.murmur, "cluster", "--nodes", str(n), "--model", "lenet", "--data", f"mnist:{mnist}",
           "--partition", "iid", "--rounds", str(rounds), "--local-steps", "5", "--eval-every", "0", "--out", str(out)]
    print(f"bench_dsgd: murmur {' '.join(cmd[1:])}", file=sys.stderr)
    before = machine_used_bytes()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pss = PssSampler(lambda: children(proc.pid), every=5.0)
    stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    wall = time.monotonic() - start
    pss.finish()
    result = {"nodes": n, "rounds": rounds, "exit_status": proc.returncode, "wall_seconds": wall,
              "machine_memory_bytes": pss.machine_peak - before,
              "sum_of_peak_pss_bytes": sum(pss.peak.values()) if pss.peak else None}
    cluster_json = out / "cluster.json"
    if not cluster_json.exists():
        print(f"bench_dsgd: {n} nodes: no cluster.json ({proc.returncode}): {stderr[-2000:]}", file=sys.stderr)
        return {**result, "finished": 0}
    cluster = json.loads(cluster_json.read_text())
    nodes = cluster["nodes"]
    peaks = [x["peak_rss_bytes"] for x in nodes if x.get("peak_rss_bytes")]
    return {**result,
            "finished": sum(1 for x in nodes if x["exit_status"] == 0 and x["rounds"] == rounds),
            "peak_rss_bytes_max": max(peaks, default=None),
            "accuracy": (cluster.get("average") or {}).get("eval_accuracy")}


def many_nodes_report(r):
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.1f} GiB"
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"
    acc = "n/a" if r.get("accuracy") is None else f"{r['accuracy'] * 100:.2f}%"
    return "\n".join([
        f"## {r['nodes']} lenet nodes on this machine ({r['rounds']}-round gossip run, 5 local steps, MNIST IID)", "",
        "| finished | wall time | peak RSS, largest node | machine memory used (peak, sampled) | sum of the nodes' peak PSS | average model accuracy |",
        "|---|---|---|---|---|---|",
        f"| {r['finished']} of {r['nodes']} | {r['wall_seconds']:.0f} s | {mib(r.get('peak_rss_bytes_max'))} | "
        f"{gib(r['machine_memory_bytes'])} | {gib(r['sum_of_peak_pss_bytes'])} | {acc} |", ""])


def gloo(args, mnist):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    worker = ["--task", f"lenet-mnist:{mnist}", "--optimizer", f"sgd:{LR},{MOMENTUM}", "--rounds", str(args.rounds),
              "--local-steps", str(LOCAL), "--batch", str(BATCH)]
    start = time.monotonic()
    procs = gloo_ring.start(args.python, NODES, worker, env=env)
    pss = PssSampler(lambda: [p.pid for p in procs])
    try:
        ranks = gloo_ring.finish(procs, TIMEOUT_S)
    finally:
        peak_pss = pss.finish()
    wall = time.monotonic() - start
    compute = [statistics.fmean(r["compute"]) for r in ranks]
    comm = [statistics.fmean(r["comm"]) for r in ranks]
    return {
        "side": "gloo",
        "parameters": ranks[0]["parameters"],
        "compute_seconds_per_round": statistics.fmean(compute),
        "communication_seconds_per_round": statistics.fmean(comm),
        "communication_median_seconds": statistics.median(c for r in ranks for c in r["comm"]),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ranks),
        "peak_pss_bytes": peak_pss,
        "accuracy": ranks[0]["accuracy"],
        "wall_seconds": wall,
    }


def murmur(args, mnist, overlap=False):
    out = Path(args.out) / "dsgd" / ("murmur-overlap" if overlap else "murmur")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [args.murmur, "cluster", "--nodes", str(NODES), "--strategy", "gossip", "--topology", "ring",
           "--model", "lenet", "--data", f"mnist:{mnist}", "--partition", "iid", "--optimizer", "sgd",
           "--lr", str(LR), "--momentum", str(MOMENTUM), "--batch-size", str(BATCH), "--local-steps", str(LOCAL),
           "--rounds", str(args.rounds), "--eval-every", "0", "--out", str(out)] + (["--overlap"] if overlap else [])
    print(f"bench_dsgd: murmur {' '.join(cmd[1:])}", file=sys.stderr)
    start = time.monotonic()
    # The nodes log each step of every exchange (debug events, a dozen lines a
    # round) as JSON: the timeline below is read from node-I.log.
    env = dict(os.environ, MURMUR_LOG="warn,murmur=debug,murmur_core::net::service=debug", MURMUR_LOG_FORMAT="json")
    cluster_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pss = PssSampler(lambda: children(cluster_proc.pid))
    stdout, stderr = cluster_proc.communicate(timeout=TIMEOUT_S)
    wall = time.monotonic() - start
    peak_pss = pss.finish()
    if cluster_proc.returncode != 0:
        raise RuntimeError(f"murmur cluster failed ({cluster_proc.returncode}): {stdout[-2000:]}{stderr[-2000:]}")
    cluster = json.loads((out / "cluster.json").read_text())
    summary = json.loads((out / "node-0" / "summary.json").read_text())
    nodes = cluster["nodes"]
    rounds = args.rounds
    return {
        "side": "murmur --overlap" if overlap else "murmur",
        "parameters": summary["parameters"],
        "compute_seconds_per_round": statistics.fmean(n["timing"]["compute_seconds"] / rounds for n in nodes),
        "communication_seconds_per_round": statistics.fmean(n["timing"]["communication_seconds"] / rounds for n in nodes),
        "communication_split_seconds_per_round": {
            part: statistics.fmean(n["timing"][f"{part}_seconds"] / rounds for n in nodes)
            for part in ("handoff", "exchange", "resume")},
        "timeline": timeline(out, cluster),
        # The cluster and its nodes (its children): the largest one's peak.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "node_peak_rss_bytes": max(n["peak_rss_bytes"] for n in nodes),
        "peak_pss_bytes": peak_pss,
        "accuracy": (cluster.get("average") or {}).get("eval_accuracy"),
        "wall_seconds": wall,
    }


def timeline(out, cluster):
    """Where an exchange's time goes, from the nodes' debug events (JSON logs on one machine, so
    their timestamps compare across processes). Per node and round (the first and last left out):
    from its local phase's end to the mixed parameters going to its trainer, and how much of that
    was waiting for a ring neighbour that ended its own phase later; per payload, from the
    sender's phase end to the receiver having read it, split into the sender's hand-over to its
    network thread, the write, and the receiver's hand-over to its driver. Seconds: mean, median."""
    from collections import defaultdict
    from datetime import datetime

    index = {n["peer_id"]: n["index"] for n in cluster["nodes"]}
    n = len(index)
    ended, mixed, read, arrived = defaultdict(dict), defaultdict(dict), defaultdict(dict), defaultdict(dict)
    opened, written = defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list))
    for i in range(n):
        for line in (out / f"node-{i}.log").read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            f, t = e.get("fields", {}), datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
            m, peer = f.get("message"), index.get(f.get("peer"))
            if m == "local phase ended":
                ended[i][f["round"]] = t
            elif m == "mixed parameters to the trainer":
                mixed[i][f["round"]] = t
            elif m == "payload read" and peer is not None:
                read[i][(peer, f["slot"])] = t
            elif m == "payload arrived" and peer is not None:
                arrived[i][(peer, f["slot"])] = t
            elif m == "opening a payload stream" and peer is not None:
                opened[i][peer].append(t)
            elif m == "payload written" and peer is not None:
                written[i][peer].append(t)
    rounds = min((len(ended[i]) for i in range(n)), default=0)
    parts = defaultdict(list)
    for j in range(n):
        ring = [(j - 1) % n, (j + 1) % n]
        for r in range(1, rounds - 1):
            if r not in mixed[j] or r not in ended[j] or any(r not in ended[i] for i in ring):
                continue
            later = max(ended[i][r] for i in ring)
            parts["exchange"].append(mixed[j][r] - ended[j][r])
            parts["waiting_for_a_later_neighbour"].append(max(0.0, later - ended[j][r]))
            parts["after_both_ended"].append(mixed[j][r] - max(ended[j][r], later))
            for i in ring:
                if (i, r) in read[j]:
                    parts["payload_sender_end_to_read"].append(read[j][(i, r)] - ended[i][r])
                    parts["payload_read_to_driver"].append(arrived[j][(i, r)] - read[j][(i, r)])
                # The r-th stream a node opened to a peer carries round r.
                if r < len(opened[i][j]):
                    parts["payload_sender_end_to_stream"].append(opened[i][j][r] - ended[i][r])
                    if r < len(written[i][j]):
                        parts["payload_write"].append(written[i][j][r] - opened[i][j][r])
    return {k: {"mean": statistics.fmean(v), "median": statistics.median(v), "samples": len(v)}
            for k, v in parts.items() if v}


def report(m, g, rounds):
    round_m = m["compute_seconds_per_round"] + m["communication_seconds_per_round"]
    round_g = g["compute_seconds_per_round"] + g["communication_seconds_per_round"]
    ratios = {
        "communication": m["communication_seconds_per_round"] / g["communication_seconds_per_round"],
        "round": round_m / round_g,
        "peak_rss": m["peak_rss_bytes"] / g["peak_rss_bytes"],
        "wall": m["wall_seconds"] / g["wall_seconds"],
    }
    targets = {"communication": 1.0, "round": 0.9, "peak_rss": 0.35}
    ms = lambda s: f"{s * 1000:.1f} ms"
    acc = lambda a: "n/a" if a is None else f"{a * 100:.2f}%"
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.0f} MiB"
    rows = [
        ("compute per round", ms(m["compute_seconds_per_round"]), ms(g["compute_seconds_per_round"]),
         m["compute_seconds_per_round"] / g["compute_seconds_per_round"], None),
        ("communication per round", ms(m["communication_seconds_per_round"]),
         ms(g["communication_seconds_per_round"]) + f" (median {ms(g['communication_median_seconds'])})",
         ratios["communication"], targets["communication"]),
        ("round", ms(round_m), ms(round_g), ratios["round"], targets["round"]),
        ("peak RSS per process", f"{m['peak_rss_bytes'] / 2**20:.0f} MiB", f"{g['peak_rss_bytes'] / 2**20:.0f} MiB",
         ratios["peak_rss"], targets["peak_rss"]),
        ("peak PSS per process (sampled)", mib(m["peak_pss_bytes"]), mib(g["peak_pss_bytes"]),
         None if None in (m["peak_pss_bytes"], g["peak_pss_bytes"]) else m["peak_pss_bytes"] / g["peak_pss_bytes"], None),
        ("held-out accuracy, average model", acc(m["accuracy"]), acc(g["accuracy"]), None, None),
        ("wall time, launch to exit", f"{m['wall_seconds']:.1f} s", f"{g['wall_seconds']:.1f} s", ratios["wall"], None),
    ]
    lines = [f"# D-SGD: murmur against a gloo script ({NODES} processes, ring, lenet on MNIST, {rounds} rounds)", "",
             "| | murmur | gloo | murmur / gloo | target | met |", "|---|---|---|---|---|---|"]
    for name, a, b, ratio, target in rows:
        r = "" if ratio is None else f"{ratio:.2f}x"
        t = "" if target is None else f"<= {target}x"
        met = "" if target is None else ("yes" if ratio <= target else "no")
        lines.append(f"| {name} | {a} | {b} | {r} | {t} | {met} |")
    split = m["communication_split_seconds_per_round"]
    lines += ["", "Where murmur's communication goes (summary.json `timing`, per round): "
              f"handoff {ms(split['handoff'])}, exchange {ms(split['exchange'])}, resume {ms(split['resume'])}. "
              "From the nodes' debug events (mean / median):", "",
              "| | mean | median |", "|---|---|---|"]
    names = {
        "exchange": "local phase end to mixed parameters handed to the trainer",
        "waiting_for_a_later_neighbour": "of which waiting for a neighbour that ended later",
        "after_both_ended": "of which after both had ended",
        "payload_sender_end_to_read": "a payload: sender's phase end to the receiver having read it",
        "payload_sender_end_to_stream": "  sender's driver to its network thread opening the stream",
        "payload_write": "  writing it (TLS, yamux)",
        "payload_read_to_driver": "  receiver's network thread to its driver",
    }
    for key, name in names.items():
        t = m["timeline"].get(key)
        if t:
            lines.append(f"| {name} | {ms(t['mean'])} | {ms(t['median'])} |")
    return ratios, "\n".join(lines) + "\n"


def overlap_report(o, g, m):
    """murmur --overlap beside the gloo script and blocking murmur: another
    algorithm (CoCoD-SGD: the next local phase runs during the exchange), so
    its ratios are reported, not held to the targets."""
    rnd = lambda x: x["compute_seconds_per_round"] + x["communication_seconds_per_round"]
    ms = lambda s: f"{s * 1000:.1f} ms"
    acc = lambda a: "n/a" if a is None else f"{a * 100:.2f}%"
    rows = [
        ("compute per round", "compute_seconds_per_round", ms),
        ("communication per round", "communication_seconds_per_round", ms),
        ("held-out accuracy, average model", "accuracy", acc),
        ("wall time, launch to exit", "wall_seconds", lambda s: f"{s:.1f} s"),
    ]
    lines = ["", "## murmur --overlap (the next local phase trains while the exchange runs)", "",
             "| | murmur --overlap | murmur | gloo | --overlap / gloo |", "|---|---|---|---|---|"]
    for name, key, fmt in rows:
        ratio = "" if key == "accuracy" or not g.get(key) else f"{o[key] / g[key]:.2f}x"
        lines.append(f"| {name} | {fmt(o[key])} | {fmt(m[key])} | {fmt(g[key])} | {ratio} |")
    lines.append(f"| round | {ms(rnd(o))} | {ms(rnd(m))} | {ms(rnd(g))} | {rnd(o) / rnd(g):.2f}x |")
    ratios = {"communication": o["communication_seconds_per_round"] / g["communication_seconds_per_round"],
              "round": rnd(o) / rnd(g), "wall": o["wall_seconds"] / g["wall_seconds"]}
    return ratios, "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--murmur", default="target/release/murmur")
    p.add_argument("--python", default=sys.executable, help="a python with torch 2.13.0 (the bench venv's)")
    p.add_argument("--out", default="target/bench")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--many-nodes", type=int, default=64, help="then a 20-round run of this many lenet nodes (0: skip)")
    p.add_argument("--no-overlap", action="store_true", help="skip the murmur --overlap run")
    args = p.parse_args()
    mnist = mnist_dir()
    # murmur first: its nodes' peak RSS is read from RUSAGE_CHILDREN, which
    # the gloo ranks would join.
    m = murmur(args, mnist)
    o = None if args.no_overlap else murmur(args, mnist, overlap=True)
    g = gloo(args, mnist)
    ratios, md = report(m, g, args.rounds)
    overlap_ratios = None
    if o:
        overlap_ratios, more = overlap_report(o, g, m)
        md += more
    many = many_nodes(args, mnist) if args.many_nodes > 0 else None
    if many:
        md += "\n" + many_nodes_report(many)
    out = Path(args.out)
    (out / "dsgd.json").write_text(json.dumps({"murmur": m, "murmur_overlap": o, "gloo": g, "ratios": ratios,
                                               "overlap_ratios": overlap_ratios, "many_nodes": many}, indent=2))
    (out / "dsgd.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
