#!/usr/bin/env bash
# `make bench`: training throughput of `murmur train` against PyTorch eager on
# the same models (scripts/bench_train.py); writes target/bench/train.{json,md}.
#
# PyTorch runs from a venv cached in $MURMUR_CACHE/bench-venv, built once and
# reused. It holds no second torch: a .pth file points at the torch 2.13.0
# wheel that setup-libtorch.sh already unpacked, and pip adds only the small
# pure-Python packages `import torch` needs. That wheel is the CUDA build (PyPI
# has no other for Linux x86_64) and libtorch_python.so links cuDNN, cuBLAS,
# NCCL and friends (1.7 GB of nvidia-* wheels). A CPU-only run never calls
# them, so the venv gets small stand-ins instead: libraries with the same
# names, versions and symbols whose functions abort if ever called. They sit
# in site-packages/nvidia/cu13/lib, where torch's own loader looks for the
# nvidia-* wheels.
#
# Arguments go to bench_train.py (--threads N, --runs N, --models mlp,lenet,
# --scale 0.1 for a quick smoke run; see --help).
# Environment: MURMUR_CACHE (default ~/.cache/murmur), MURMUR_DATA_DIR (the
# test data, default ../shared/data), MURMUR_THREADS (threads, default 1).
set -euo pipefail

cd "$(dirname "$0")/.."
torch_dir="$(scripts/setup-libtorch.sh)"
cache="${MURMUR_CACHE:-$HOME/.cache/murmur}"
venv="$cache/bench-venv"
# The only packages `import torch` and an eager training step import (sympy
# brings mpmath); torch's other dependencies serve torch.compile and the hub.
deps=("typing_extensions>=4.10.0" "sympy>=1.13.3")

if [ ! -e "$torch_dir/__init__.py" ]; then
  echo "bench: $torch_dir is not a Python torch package; unset LIBTORCH so setup-libtorch.sh installs the wheel" >&2
  exit 1
fi

# Writes stand-ins for the CUDA libraries that torch's shared libraries need
# but the CPU install lacks, into $2.
build_cuda_stubs() {
  python3 - "$1" "$2" <<'EOF'
import pathlib, re, subprocess, sys

torch_dir, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
libs = [str(p) for p in (*torch_dir.glob("lib/*.so"), *torch_dir.glob("*.so"))]
run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

# Missing libraries, plus two that only torch's preload list names (it stops
# at the first one it cannot find). libcuda is the driver: never loaded here.
stubs = {m for lib in libs for m in re.findall(r"^\s*(\S+) => not found", run("ldd", lib), re.M)}
stubs = (stubs | {"libnvrtc-builtins.so.13", "libnvJitLink.so.13"}) - {"libcuda.so.1"}
symbols = {s: set() for s in stubs}
versions = {}  # stub -> version name its symbols carry
# The C APIs without symbol versions, by prefix.
unversioned = {"nccl": "libnccl.so.2", "cusparseLt": "libcusparseLt.so.0", "cuFile": "libcufile.so.0"}
for lib in libs:
    owner, file = {}, None
    for line in run("readelf", "-V", "-W", lib).splitlines():
        if m := re.search(r"File: (\S+)", line):
            file = m.group(1)
        elif (m := re.search(r"Name: (\S+)", line)) and file in stubs:
            owner[m.group(1)] = file
            versions[file] = m.group(1)
    for line in run("readelf", "--dyn-syms", "-W", lib).splitlines():
        f = line.split()
        if len(f) < 8 or f[6] != "UND":
            continue
        name, _, ver = f[7].partition("@")
        if ver in owner:
            symbols[owner[ver]].add(name)
        elif not ver:
            for prefix, stub in unversioned.items():
                if name.startswith(prefix) and stub in stubs:
                    symbols[stub].add(name)

out.mkdir(parents=True, exist_ok=True)
for stub, names in sorted(symbols.items()):
    src, script = out / f"{stub}.c", out / f"{stub}.map"
    body = "".join(f"void {n}(void) {{ stub(\"{n}\"); }}\n" for n in sorted(names))
    src.write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n"
        f"static void stub(const char *f) {{ fprintf(stderr, \"{stub} is a CPU-only stand-in; %s called\\n\", f); abort(); }}\n"
        + body
    )
    cmd = ["cc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{stub}", "-o", str(out / stub), str(src)]
    if stub in versions:
        script.write_text(f"{versions[stub]} {{ global: *; }};\n")
        cmd.append(f"-Wl,--version-script={script}")
    run(*cmd)
    src.unlink()
    script.unlink(missing_ok=True)
    print(f"  {stub}: {len(names)} symbols", file=sys.stderr)
EOF
}

if [ ! -e "$venv/.complete" ]; then
  command -v cc >/dev/null || { echo "bench: no C compiler (cc); it builds the venv's CUDA stand-ins once" >&2; exit 1; }
  echo "bench: creating $venv (once)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: "${deps[@]}" >&2
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  dirname "$torch_dir" > "$site/murmur-libtorch.pth"
  build_cuda_stubs "$torch_dir" "$site/nvidia/cu13/lib"
  "$venv/bin/python" -W "ignore:Failed to initialize NumPy" - <<'EOF'
import sys
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
model = torch.nn.Linear(4, 2)
opt = torch.optim.AdamW(model.parameters())
torch.nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.zeros(8, dtype=torch.long)).backward()
opt.step()
print(f"bench: torch {torch.__version__} imports and trains on CPU", file=sys.stderr)
EOF
  touch "$venv/.complete"
fi

"$venv/bin/python" scripts/bench_train.py --murmur target/release/murmur --out target/bench "$@"

# Transfer throughput (scripts/bench_transfer.py): /murmur/params/1 moving a
# 64 MiB payload between two `murmur bench-transfer` processes, against a raw
# TCP copy and gloo send/recv run from this venv; writes
# target/bench/transfer.{json,md}. Set MURMUR_BENCH_TRANSFER=0 to skip it.
if [ "${MURMUR_BENCH_TRANSFER:-1}" != 0 ]; then
  "$venv/bin/python" scripts/bench_transfer.py --murmur target/release/murmur --out target/bench
fi

# Round time of an 8-node gossip ring split into compute and communication,
# 100k and 5M parameters, beside the same ring hand-written on gloo from this
# venv (scripts/bench_rounds.py, stdlib only; alone, without the gloo rows:
# `python3 scripts/bench_rounds.py`); writes target/bench/rounds.{json,md}.
# Set MURMUR_BENCH_ROUNDS=0 to skip it.
if [ "${MURMUR_BENCH_ROUNDS:-1}" != 0 ]; then
  python3 scripts/bench_rounds.py --murmur target/release/murmur --out target/bench --python "$venv/bin/python"
fi

# All-reduce of a 25 MB vector over 4 and 8 processes: murmur's shard-owner
# all-reduce (f32 and bf16 on the wire) against gloo's all_reduce of the same
# size and process count, run from this venv (scripts/bench_allreduce.py);
# writes target/bench/allreduce.{json,md}. Set MURMUR_BENCH_ALLREDUCE=0 to skip it.
if [ "${MURMUR_BENCH_ALLREDUCE:-1}" != 0 ]; then
  "$venv/bin/python" scripts/bench_allreduce.py --murmur target/release/murmur --out target/bench
fi

# DiLoCo (scripts/bench_diloco.py, stdlib only): held-out loss against bytes
# for H = 1, 10, 50, 100, blocking, eager and delayed, f32, bf16, int8 and
# top-k (murmur sim, chargpt on Tiny Shakespeare), and eager's round time
# against blocking's under a 200 ms injected delay (murmur cluster); writes
# target/bench/diloco.{json,md,svg}. Set MURMUR_BENCH_DILOCO=0 to skip it.
if [ "${MURMUR_BENCH_DILOCO:-1}" != 0 ]; then
  python3 scripts/bench_diloco.py --murmur target/release/murmur --out target/bench
fi

if [ "${MURMUR_BENCH_ATTACK:-1}" != 0 ]; then
  python3 scripts/bench_attack.py --murmur target/release/murmur --attacker target/release/murmur-attacker --out target/bench
fi

# Semi-decentralized training (scripts/bench_semidec.py, stdlib only): S2S
# against S2A, and the rings alone, under IID shards and under components
# that each hold only a few classes (murmur sim, 12 lenet nodes on MNIST in 3
# rings); writes target/bench/semidec.{json,md,svg}. Set
# MURMUR_BENCH_SEMIDEC=0 to skip it.
if [ "${MURMUR_BENCH_SEMIDEC:-1}" != 0 ]; then
  python3 scripts/bench_semidec.py --murmur target/release/murmur --out target/bench
fi

# The shipped chaos scenarios (scripts/bench_chaos.py, stdlib only), each on
# MNIST with lenet (its test's timeline and steps), against the same cluster
# without the events; writes target/bench/chaos.{json,md}. Set
# MURMUR_BENCH_CHAOS=0 to skip it.
if [ "${MURMUR_BENCH_CHAOS:-1}" != 0 ]; then
  python3 scripts/bench_chaos.py --murmur target/release/murmur --out target/bench
fi

# Decentralized SGD against the same algorithm hand-written on gloo
# (scripts/bench_dsgd.py, run with this venv's torch): 8 processes, ring,
# lenet on MNIST, 100 rounds; communication and compute per round, peak RSS
# and PSS, accuracy and wall time side by side with the ratios, where
# murmur's exchange time goes (its nodes' debug events), then a 20-round run
# of 64 lenet nodes; writes target/bench/dsgd.{json,md}. Set
# MURMUR_BENCH_DSGD=0 to skip it.
if [ "${MURMUR_BENCH_DSGD:-1}" != 0 ]; then
  "$venv/bin/python" scripts/bench_dsgd.py --murmur target/release/murmur --python "$venv/bin/python" --out target/bench
fi

# How far `murmur sim` scales (scripts/bench_sim.py, stdlib only): pure
# averaging, 20 rounds, ring, exponential and one-peer-exp at 1,000, 10,000
# and 100,000 nodes on every core, wall time and peak memory per node
# against the 1,000-node run, and each 10,000-node run again on one thread
# (the threads' speed-up); writes target/bench/sim_scale.{json,md}. Set
# MURMUR_BENCH_SIM=0 to skip it.
if [ "${MURMUR_BENCH_SIM:-1}" != 0 ]; then
  python3 scripts/bench_sim.py --murmur target/release/murmur --out target/bench
fi
