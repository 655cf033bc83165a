"""A node's training speed and peak memory under attack, stdlib only.

Three `murmur run` processes on 127.0.0.1 train an MLP (hidden 512,512 on
the built-in synthetic data: 284,682 parameters, 1.14 MB a model) over a
complete graph. After a warm-up, `murmur-attacker` (tests/attacker) attacks
node 0 for a fixed window in one way per scenario; the scenario without an
attack, run in the same invocation, is the baseline. Per scenario:

- speed: node 0's rounds per second over the window (from `murmur status`),
  and its ratio to the baseline's (target: at least 0.8x);
- memory: node 0's peak RSS (VmHWM) against an honest peer's in the same
  run plus the README's bound on payload buffers, (R + E + S + B + 3d) x M
  = (32 + 64 + 8 + 8 + 3 x 3) x M (target: within it).

Writes <out>/attack.json and <out>/attack.md.
"""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEED_TARGET = 0.8
HIDDEN = (512, 512)
PARAMS = 32 * HIDDEN[0] + HIDDEN[0] + HIDDEN[0] * HIDDEN[1] + HIDDEN[1] + HIDDEN[1] * 10 + 10
MODEL_BYTES = 4 * PARAMS
BOUND_MODELS = 32 + 64 + 8 + 8 + 3 * 3
SCENARIOS = [
    ("none", None),
    ("silent streams, member", ["--as-member", "silent-streams", "300"]),
    ("silent streams, stranger", ["silent-streams", "300"]),
    ("pull flood", ["pull-flood"]),
    ("far rounds and huge weights", ["payloads"]),
    ("sybil heartbeats (relay)", ["sybil", "20"]),
    ("a member that never sends", ["--as-member", "sybil", "1"]),
    ("refused plus valid (a member a beat behind)", ["double-send"]),
]


def status(murmur, api):
    out = subprocess.run([murmur, "status", "--json", api], capture_output=True, text=True)
    return json.loads(out.stdout)[0] if out.returncode == 0 else {}


def peak_rss(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def start(murmur, root, i, boot, extra):
    d = root / f"node-{i}"
    cmd = [murmur, "run", "--data-dir", str(d), "--nodes", "3", "--node", str(i)]
    cmd += ["--listen", "/ip4/127.0.0.1/tcp/0", "--progress", "json", "--data", "synthetic"]
    cmd += ["--hidden", ",".join(map(str, HIDDEN)), "--rounds", "1000000", "--local-steps", "10"]
    cmd += ["--topology", "complete", "--round-timeout-ms", "3000", "--join-timeout-ms", "30000"]
    if boot:
        cmd += ["--bootstrap", boot]
    cmd += extra
    log = open(root / f"node-{i}.log", "w")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=dict(os.environ, MURMUR_THREADS="1"))
    first = json.loads(p.stdout.readline())
    return p, first


def scenario(args, name, attack):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nodes = []
        try:
            p0, first = start(args.murmur, root, 0, None, args.node_arg)
            nodes.append((p0, first))
            for i in (1, 2):
                nodes.append(start(args.murmur, root, i, first["addrs"][0], args.node_arg))
            api = first["api"]
            deadline = time.time() + 60
            while (status(args.murmur, api).get("round") or 0) < 3:
                if time.time() > deadline:
                    raise RuntimeError(f"{name}: the nodes did not start training")
                time.sleep(0.2)
            time.sleep(args.warmup)
            r0, t0 = status(args.murmur, api)["round"], time.time()
            said, attacker_cpu = {}, 0.0
            if attack:
                cmd = [args.attacker, "--target", first["addrs"][0], "--elements", str(PARAMS)]
                cmd += ["--secs", str(args.window), *attack]
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.window + 60)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                attacker_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
                said = json.loads(done.stdout.strip() or "{}")
            else:
                time.sleep(args.window)
            r1, t1 = status(args.murmur, api)["round"], time.time()
            st = status(args.murmur, api)
            row = {
                "scenario": name,
                "rounds_per_s": (r1 - r0) / (t1 - t0),
                "peak_rss": peak_rss(nodes[0][0].pid),
                "honest_peak_rss": max(peak_rss(p.pid) for p, _ in nodes[1:]),
                "refusals": st.get("refusals", {}),
                "strategy_drops": st.get("strategy_drops", {}),
                "attacker": said,
                # CPU seconds the attacker process took from the cores it
                # shares with the three nodes, per second of the window.
                "attacker_cpu_share": attacker_cpu / (t1 - t0),
            }
        finally:
            for p, _ in nodes:
                p.send_signal(signal.SIGTERM)
            for p, _ in nodes:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
    row["bound"] = row["honest_peak_rss"] + BOUND_MODELS * MODEL_BYTES
    row["within_bound"] = row["peak_rss"] <= row["bound"]
    mb = lambda b: f"{b / 2**20:.0f} MiB"
    print(
        f"{name}: {row['rounds_per_s']:.1f} rounds/s, attacker CPU {row['attacker_cpu_share']:.2f} cores, peak {mb(row['peak_rss'])} (honest {mb(row['honest_peak_rss'])}, bound {mb(row['bound'])})",
        file=sys.stderr,
        flush=True,
    )
    return row


def report(rows):
    base = rows[0]["rounds_per_s"]
    lines = [
        "# A node under attack",
        "",
        f"Three nodes, MLP {HIDDEN[0]}x{HIDDEN[1]} ({PARAMS:,} parameters, {MODEL_BYTES / 1e6:.2f} MB), "
        f"complete graph; the attack hits node 0. Speed is node 0's rounds per second during the "
        f"attack window, against the run without one in this invocation (target {SPEED_TARGET}x). "
        f"Memory is node 0's peak RSS against an honest peer's plus the payload bound "
        f"({BOUND_MODELS} x M = {BOUND_MODELS * MODEL_BYTES / 2**20:.0f} MiB). Attacker CPU is what the "
        f"attacker process used, in cores, of the machine's {os.cpu_count()} that it shares with the nodes.",
        "",
        "| scenario | rounds/s | ratio | attacker CPU | peak RSS | honest peer | within bound | refusals and drops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        r["ratio"] = r["rounds_per_s"] / base if base else 0.0
        counts = {**r["refusals"], **r["strategy_drops"]}
        top = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:4])
        lines.append(
            f"| {r['scenario']} | {r['rounds_per_s']:.1f} | {r['ratio']:.2f}x | {r['attacker_cpu_share']:.2f} cores "
            f"| {r['peak_rss'] / 2**20:.0f} MiB "
            f"| {r['honest_peak_rss'] / 2**20:.0f} MiB | {'yes' if r['within_bound'] else 'NO'} | {top} |"
        )
    met = all(r["ratio"] >= SPEED_TARGET for r in rows) and all(r["within_bound"] for r in rows)
    lines += ["", f"All scenarios at least {SPEED_TARGET}x and within the bound: {'yes' if met else 'no'}."]
    return "\n".join(lines) + "\n", met


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--murmur", default="target/release/murmur")
    ap.add_argument("--attacker", default="target/release/murmur-attacker")
    ap.add_argument("--out", default="target/bench")
    ap.add_argument("--window", type=int, default=12, help="seconds each attack lasts")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--node-arg", action="append", default=[], help="one more argument for every `murmur run` (repeatable), as in --node-arg=--straggler-grace --node-arg=0")
    ap.add_argument("--only", action="append", default=[], help="run only the scenarios whose name contains this (repeatable; the baseline always runs)")
    args = ap.parse_args()
    chosen = [(n, a) for n, a in SCENARIOS if a is None or not args.only or any(o in n for o in args.only)]
    rows = [scenario(args, name, attack) for name, attack in chosen]
    text, met = report(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps({"params": PARAMS, "rows": rows, "met": met}, indent=1))
    (out / "attack.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
