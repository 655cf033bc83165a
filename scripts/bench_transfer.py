"""Transfer throughput on loopback: murmur's `/murmur/params/1` against a raw
TCP socket and PyTorch gloo send/recv, all in one run.

Every mode moves the same payload, --mib MiB of float32 parameters (16M
values at 64 MiB), from one process to another on 127.0.0.1:

- murmur-f32 and murmur-bf16: `murmur bench-transfer` on both ends, the real
  `Network` (TCP + TLS 1.3 + Yamux, murmur's default), values encoded as f32
  or bf16;
- murmur-f32-noise and murmur-bf16-noise: the same with Noise instead of TLS
  (`--security noise`; ChaCha20-Poly1305, Noise's only cipher);
- raw-tcp: `murmur bench-transfer --raw-tcp`, the f32 bytes over a plain
  tokio TcpStream (no framing, no encryption, no checks) into a reused buffer;
- gloo: two Python processes, `torch.distributed` with the gloo backend,
  `dist.send`/`dist.recv` of one float32 tensor into a reused tensor;
- raw-tcp-fresh and gloo-fresh: the same into a new buffer for every
  payload (and the page faults that costs).

The targets compare against raw-tcp and gloo, the faster baselines.

A payload's time runs from the sender's wall clock just before its first byte
to the receiver holding the values (murmur: validated and decoded). Each
process pair moves --repeat payloads; the first is a warm-up and is dropped.
Modes alternate, --runs rounds of all four, and the medians count. Wire bytes
are TCP's `bytes_sent` on the sender's socket over every payload of the pair,
handshakes and heartbeats included. Writes <out>/transfer.json and
<out>/transfer.md and prints the report.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gloo_ring import free_port

F32_VS_RAW_TARGET = 0.3
BF16_VS_GLOO_TARGET = 1.0
WIRE_TARGET = 1.02
MODES = (
    "murmur-f32", "murmur-bf16", "raw-tcp", "gloo", "raw-tcp-fresh", "gloo-fresh", "murmur-f32-noise", "murmur-bf16-noise",
)  # fmt: skip
TIMEOUT_S = 180


def murmur_pair(args, encoding, raw, fresh=False, security=None):
    """Runs both ends of `murmur bench-transfer`; returns receiver and sender records."""
    # Both ends name the encoding: a receiver accepts only its run's and f32.
    common = ["bench-transfer", "--mib", str(args.mib), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    common += ["--encoding", encoding]
    common += ["--raw-tcp"] if raw else []
    common += ["--security", security] if security else []
    fresh_args = ["--fresh-buffer"] if fresh else []
    recv = subprocess.Popen(
        [args.murmur, *common, *fresh_args, "--role", "recv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        first = recv.stdout.readline()
        if not first:
            raise RuntimeError(f"receiver exited early: {recv.stderr.read().strip()}")
        addr = json.loads(first)
        send_args = ["--role", "send", "--peer", addr, "--shards", str(args.shards)]
        sent = subprocess.run([args.murmur, *common, *send_args], capture_output=True, text=True, timeout=TIMEOUT_S)
        if sent.returncode != 0:
            raise RuntimeError(f"sender failed ({sent.returncode}): {sent.stderr.strip()}")
        out, err = recv.communicate(timeout=TIMEOUT_S)
        if recv.returncode != 0:
            raise RuntimeError(f"receiver failed ({recv.returncode}): {err.strip()}")
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    received = [json.loads(line) for line in out.splitlines() if line.strip()]
    sender = [json.loads(line) for line in sent.stdout.splitlines() if line.strip()]
    return received, sender


def gloo_pair(args, fresh):
    """Runs two gloo workers (this script with --gloo-worker); returns the receiver's records."""
    port = str(free_port())
    worker = [sys.executable, __file__, "--mib", str(args.mib), "--repeat", str(args.repeat)]
    worker += ["--gloo-fresh"] if fresh else []
    worker += ["--gloo-worker"]
    procs = [
        subprocess.Popen([*worker, str(rank), port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (1, 0)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            if p.returncode != 0:
                raise RuntimeError(f"gloo worker failed ({p.returncode}): {err.strip()[-2000:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads(line) for line in outs[0].splitlines() if line.strip()], []


def gloo_worker(rank, port, mib, repeat, fresh):
    """One end of the gloo transfer. Rank 0 sends, rank 1 receives (into a new
    tensor each time when `fresh`) and prints."""
    import warnings

    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    n = mib * 1024 * 1024 // 4
    if rank == 0:
        tensor = torch.sin(torch.arange(n, dtype=torch.float32).remainder_(65521) * 0.013) * 0.1
    else:
        tensor = torch.empty(n, dtype=torch.float32)
    stamp = torch.zeros(1, dtype=torch.float64)
    for index in range(repeat):
        dist.barrier()
        if rank == 0:
            stamp[0] = time.time()
            dist.send(tensor, 1)
            dist.send(stamp, 1)
        else:
            if fresh:
                tensor = torch.empty(n, dtype=torch.float32)
            dist.recv(tensor, 0)
            done = time.time()
            dist.recv(stamp, 0)
            secs = done - stamp.item()
            body = tensor.numel() * 4
            line = {"role": "recv", "transport": "gloo", "index": index, "elements": n, "body_bytes": body,
                    "seconds": secs, "mb_per_s": body / secs / 1e6, "params_per_s": n / secs}  # fmt: skip
            print(json.dumps(line), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def run_mode(args, mode):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    fresh = mode.endswith("-fresh")
    if mode.startswith("gloo"):
        received, sender = gloo_pair(args, fresh)
    else:
        encoding = mode.split("-")[1] if mode.startswith("murmur") else "f32"
        security = "noise" if mode.endswith("-noise") else None
        received, sender = murmur_pair(args, encoding, raw=mode.startswith("raw-tcp"), fresh=fresh, security=security)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed = [r for r in received if isinstance(r, dict) and r.get("index", 0) >= 1]
    if len(timed) != args.repeat - 1:
        raise RuntimeError(f"{mode}: expected {args.repeat - 1} timed payloads, got {len(timed)}")
    summary = next((s for s in sender if s.get("summary")), {})
    body = sum(s["body_bytes"] for s in sender if not s.get("summary"))
    return {
        "timed": timed,
        "encode_seconds": [s["encode_seconds"] for s in sender if "encode_seconds" in s],
        "body_bytes": body,
        "frame_bytes": summary.get("frame_bytes"),
        "tcp_bytes": summary.get("tcp_bytes"),
        "cpu_seconds": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    }


def summarize(samples):
    timed = [t for s in samples for t in s["timed"]]
    med = lambda key: statistics.median(t[key] for t in timed)  # noqa: E731
    body = sum(s["body_bytes"] for s in samples)
    ratio = lambda key: (  # noqa: E731
        sum(s[key] for s in samples) / body if body and all(s[key] is not None for s in samples) else None
    )
    encode = [e for s in samples for e in s["encode_seconds"]]
    return {
        "payloads": len(timed),
        "body_bytes_per_payload": timed[0]["body_bytes"],
        "elements_per_payload": timed[0]["elements"],
        "seconds_median": med("seconds"),
        "mb_per_s_median": med("mb_per_s"),
        "params_per_s_median": med("params_per_s"),
        "mb_per_s_all": [round(t["mb_per_s"], 1) for t in timed],
        "wire_bytes_per_payload_byte": ratio("tcp_bytes"),
        "frame_bytes_per_payload_byte": ratio("frame_bytes"),
        "encode_seconds_median": statistics.median(encode) if encode else None,
        "cpu_seconds_per_pair": [round(s["cpu_seconds"], 3) for s in samples],
    }


def targets(modes):
    out = {}
    if "murmur-f32" in modes and "raw-tcp" in modes:
        v = modes["murmur-f32"]["mb_per_s_median"] / modes["raw-tcp"]["mb_per_s_median"]
        out["f32_mb_per_s_vs_raw_tcp"] = {"value": v, "target": F32_VS_RAW_TARGET, "met": v >= F32_VS_RAW_TARGET}
    if "murmur-bf16" in modes and "gloo" in modes:
        v = modes["murmur-bf16"]["params_per_s_median"] / modes["gloo"]["params_per_s_median"]
        out["bf16_params_per_s_vs_gloo_f32"] = {"value": v, "target": BF16_VS_GLOO_TARGET, "met": v >= BF16_VS_GLOO_TARGET}
    for mode in ("murmur-f32", "murmur-bf16"):
        v = modes.get(mode, {}).get("wire_bytes_per_payload_byte")
        if v is not None:
            out[f"{mode.split('-')[1]}_wire_bytes_per_payload_byte"] = {"value": v, "target": WIRE_TARGET, "met": v <= WIRE_TARGET}
    return out


def report(result):
    modes, goals = result["modes"], result["targets"]
    raw = modes.get("raw-tcp", {}).get("mb_per_s_median")
    gloo = modes.get("gloo", {}).get("params_per_s_median")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    rows = [
        f"| {name} | {m['body_bytes_per_payload'] / 2**20:.0f} | {m['mb_per_s_median']:.0f} | "
        f"{m['params_per_s_median'] / 1e6:.0f} | {fmt(raw and m['mb_per_s_median'] / raw, '.2f')} | "
        f"{fmt(gloo and m['params_per_s_median'] / gloo, '.2f')} | {fmt(m['wire_bytes_per_payload_byte'], '.4f')} |"
        for name, m in modes.items()
    ]
    table = [
        "| mode | payload MiB | MB/s | M params/s | MB/s vs raw TCP | params/s vs gloo | wire / payload bytes |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]
    words = {
        "f32_mb_per_s_vs_raw_tcp": "murmur f32 reaches {v:.2f}x raw TCP's MB/s (target >= {t}x)",
        "bf16_params_per_s_vs_gloo_f32": "murmur bf16 moves {v:.2f}x the parameters/s of gloo's f32 send/recv (target >= {t}x)",
        "f32_wire_bytes_per_payload_byte": "f32 puts {v:.4f} TCP bytes on the wire per payload byte (target <= {t})",
        "bf16_wire_bytes_per_payload_byte": "bf16 puts {v:.4f} TCP bytes on the wire per payload byte (target <= {t})",
    }
    verdicts = "; ".join(
        words[k].format(v=g["value"], t=g["target"]) + (": met" if g["met"] else ": MISSED") for k, g in goals.items()
    )
    fresh = ""
    if {"murmur-f32", "murmur-bf16", "raw-tcp-fresh", "gloo-fresh"} <= modes.keys():
        f32 = modes["murmur-f32"]["mb_per_s_median"] / modes["raw-tcp-fresh"]["mb_per_s_median"]
        bf16 = modes["murmur-bf16"]["params_per_s_median"] / modes["gloo-fresh"]["params_per_s_median"]
        fresh = (
            f" Against baselines that also receive into a new buffer, f32 reaches {f32:.2f}x raw TCP's MB/s and bf16 "
            f"{bf16:.2f}x gloo's parameters/s."
        )
    machine = result["machine"]
    paragraph = (
        f"Loopback transfer of one {result['mib']} MiB float32 payload ({result['mib'] * 2**18 / 1e6:.1f}M parameters) "
        f"between two processes on a {machine['nproc']}-core {machine['cpu']}, medians of {result['runs']} alternating "
        f"rounds x {result['repeat'] - 1} timed payloads per mode (MB = 10^6 bytes of payload body; bf16 moves half "
        f"the bytes of the same parameters). murmur runs TCP + TLS 1.3 + Yamux (the -noise rows: Noise) with a {result['threads']}-thread tokio "
        f"runtime per process, and its time includes checksum, validation and decoding on the receiver, into the "
        f"buffer the last payload was handed back in (as a node recycles a payload once mixed); raw TCP is a bare "
        f"socket copy; the ratios are against raw TCP and gloo receiving into a reused buffer, the -fresh rows "
        f"receive into a new buffer each time. {verdicts}.{fresh}"
    )
    if machine["load_average_at_start"] > 0.5:
        paragraph += f" Other work was running (load average {machine['load_average_at_start']:.1f} at start), so these numbers are noisy."
    return "# Transfer throughput: murmur vs raw TCP vs gloo\n\n" + "\n".join(table) + "\n\n" + paragraph + "\n"


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main():
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--murmur", default=str(repo / "target/release/murmur"), help="the murmur binary")
    p.add_argument("--out", type=Path, default=repo / "target/bench", help="where transfer.json and transfer.md go")
    p.add_argument("--mib", type=int, default=64, help="payload size in MiB of float32 (default 64)")
    p.add_argument("--runs", type=int, default=5, help="alternating rounds over all modes (default 5)")
    p.add_argument("--repeat", type=int, default=4, help="payloads per process pair; the first is a warm-up (default 4)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--threads", type=int, default=2, help="tokio worker threads of each murmur process; 0 = current-thread")
    p.add_argument("--shards", type=int, default=1, help="murmur: split each payload over this many parallel substreams")
    p.add_argument("--gloo-worker", nargs=2, metavar=("RANK", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--gloo-fresh", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gloo_worker:
        gloo_worker(int(args.gloo_worker[0]), args.gloo_worker[1], args.mib, args.repeat, args.gloo_fresh)
        return
    wanted = args.modes.split(",")
    if set(wanted) - set(MODES) or args.runs < 1 or args.repeat < 2 or args.mib < 1:
        p.error(f"--modes takes {','.join(MODES)} (got {args.modes}); --runs and --mib must be >= 1, --repeat >= 2")

    result = {
        "mib": args.mib, "runs": args.runs, "repeat": args.repeat, "threads": args.threads, "shards": args.shards,
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "load_average_at_start": os.getloadavg()[0]},
    }  # fmt: skip
    samples = {m: [] for m in wanted}
    for round_ in range(args.runs):
        for mode in wanted:
            samples[mode].append(run_mode(args, mode))
            s = samples[mode][-1]
            mbs = ", ".join(f"{t['mb_per_s']:.0f}" for t in s["timed"])
            print(f"bench: round {round_ + 1}/{args.runs} {mode}: {mbs} MB/s", file=sys.stderr)
    result["modes"] = {m: summarize(s) for m, s in samples.items()}
    result["targets"] = targets(result["modes"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (args.out / "transfer.md").write_text(text)
    print(text)
    print(f"bench: wrote {args.out / 'transfer.json'} and {args.out / 'transfer.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
