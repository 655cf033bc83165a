"""Training-step throughput of `murmur train` against PyTorch eager.

For each model both sides train the same architecture (checked by parameter
count) on batches of the same shape, with AdamW at the same hyper-parameters
and the same number of intra-op threads. A step is the same work on both
sides: gather a batch from an in-memory dataset, forward, read the loss back,
zero the gradients, backward, optimizer step.

murmur: N / (t(2N) - t(N)), where t is `wall_seconds` from summary.json of a
run of N and of 2N steps. wall_seconds already leaves out start-up, data
loading and the final evaluation; the difference also cancels the first, slow
steps, so what remains is N steady-state steps.
PyTorch: N steps timed after N/10 untimed warm-up steps, in this process.

Each model runs --runs rounds of (murmur N, murmur 2N, PyTorch with
`foreach=False`, PyTorch with AdamW's default implementation, and for lenet
PyTorch with its input channels-last, as murmur lays it out) and reports
medians. Writes <out>/train.json and <out>/train.md and prints the report.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# The venv has no NumPy; torch only needs it for NumPy interop.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim import optimizer as torch_optimizer  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
TARGET = 1.0


def mlp(inputs=32, hidden=(128, 128), classes=10):
    sizes = [inputs, *hidden, classes]
    layers = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def lenet(channels=1, size=28, classes=10):
    flat = ((size // 2 - 4) // 2) ** 2 * 32
    return nn.Sequential(
        nn.Conv2d(channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, classes),
    )  # fmt: skip


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def attention(self, x):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x):
        x = x + self.attention(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharGpt(nn.Module):
    def __init__(self, vocab=65, dim=128, layers=4, heads=4, context=64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def class_batches(shape, classes, examples, batch):
    """Random examples in memory, a random batch of them per step (values do not matter)."""
    x, y = torch.randn(examples, *shape), torch.randint(classes, (examples,))

    def next_batch():
        idx = torch.randint(examples, (batch,))
        return x.index_select(0, idx), y.index_select(0, idx)

    return next_batch


def text_batches(vocab, tokens, context, batch):
    """Random windows of context + 1 tokens; inputs and next-token targets."""
    data, offsets = torch.randint(vocab, (tokens,)), torch.arange(context + 1)

    def next_batch():
        windows = data.take(torch.randint(tokens - context - 1, (batch, 1)) + offsets)
        return windows[:, :-1], windows[:, 1:]

    return next_batch


@dataclass
class Bench:
    name: str
    steps: int  # N: a few seconds of steps at 1 thread on a small machine
    batch: int
    murmur_args: list
    model: Callable  # () -> nn.Module
    batches: Callable  # batch size -> next_batch()
    # Images: murmur lays each batch out channels-last, so PyTorch runs so too.
    channels_last: bool = False


def benches(data_dir):
    gpt = ["--context", "64", "--dim", "128", "--layers", "4", "--heads", "4"]
    return [
        Bench("mlp", 10000, 64, ["--data", "synthetic"], mlp, lambda b: class_batches([32], 10, 8000, b)),
        Bench("lenet", 400, 64, ["--data", f"mnist:{data_dir}/mnist"], lenet,
              lambda b: class_batches([1, 28, 28], 10, 8000, b), channels_last=True),
        Bench("chargpt", 30, 32, ["--data", f"text:{data_dir}/tinyshakespeare/input.txt", *gpt], CharGpt,
              lambda b: text_batches(65, 1_000_000, 64, b)),
    ]  # fmt: skip


def murmur_run(args, bench, steps, out):
    """(wall_seconds, summary, minor page faults) of one `murmur train` run of `steps` steps."""
    cmd = [
        args.murmur, "train", "--model", bench.name, *bench.murmur_args,
        "--steps", str(steps), "--batch-size", str(bench.batch), "--threads", str(args.threads),
        "--optimizer", "adamw", "--lr", str(LR), "--beta1", str(BETAS[0]), "--beta2", str(BETAS[1]),
        "--eps", str(EPS), "--weight-decay", str(WEIGHT_DECAY),
        "--eval-every", "0", "--log-every", str(steps), "--out", str(out),
    ]  # fmt: skip
    # Only the flags decide the run: no MURMUR_* settings from the caller's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MURMUR_")}
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - faults
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}{done.stdout}")
    summary = json.loads((out / "summary.json").read_text())
    return summary["wall_seconds"], summary, faults


def torch_run(bench, steps, default_optimizer, channels_last=False):
    """(steps per second, parameters, minor page faults per step) of PyTorch
    eager over `steps` steps after a warm-up; `channels_last` lays each image
    batch out NHWC (oneDNN's convolutions follow the input's layout)."""
    model, next_batch = bench.model(), bench.batches(bench.batch)
    kwargs = {} if default_optimizer else {"foreach": False}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kwargs)

    def step():
        x, y = next_batch()
        if channels_last:
            # Not .contiguous(memory_format=...): with one channel a batch
            # already counts as channels-last and is left as it is.
            x = x.to(memory_format=torch.channels_last)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.item()  # murmur reads every loss (to check it is finite)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(max(steps // 10, 2)):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(steps):
        step()
    rate = steps / (time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    return rate, sum(p.numel() for p in model.parameters()), faults


def default_adamw_impl():
    """What torch.optim.AdamW picks on CPU when neither foreach nor fused is given."""
    pick = getattr(torch_optimizer, "_default_to_fused_or_foreach", None)
    if pick is None:
        return "unknown"
    fused, foreach = pick(list(nn.Linear(2, 2).parameters()), differentiable=False, use_fused=False)
    return "fused" if fused else "foreach" if foreach else "for-loop (same as foreach=False)"


def measure(args, bench, tmp):
    steps = max(int(bench.steps * args.scale), 2)
    runs = []
    for r in range(args.runs):
        t1, _, f1 = murmur_run(args, bench, steps, tmp / f"{bench.name}-{r}-n")
        t2, summary, f2 = murmur_run(args, bench, 2 * steps, tmp / f"{bench.name}-{r}-2n")
        if t2 <= t1:
            sys.exit(f"bench: {bench.name}: a {2 * steps}-step run ({t2:.3f}s) was not slower than a {steps}-step one ({t1:.3f}s); raise the steps")
        torch_sps, params, torch_faults = torch_run(bench, steps, default_optimizer=False)
        default_sps, _, _ = torch_run(bench, steps, default_optimizer=True)
        nhwc_sps = torch_run(bench, steps, default_optimizer=True, channels_last=True)[0] if bench.channels_last else 0.0
        if params != summary["parameters"]:
            sys.exit(f"bench: {bench.name}: PyTorch model has {params} parameters, murmur's {summary['parameters']}; the architectures differ")
        runs.append({
            "murmur_wall_seconds": [t1, t2],
            "murmur_steps_per_s": steps / (t2 - t1),
            "murmur_summary_steps_per_s": summary["steps_per_second"],
            "pytorch_steps_per_s": torch_sps,
            "pytorch_default_steps_per_s": default_sps,
            "pytorch_channels_last_steps_per_s": nhwc_sps,
            # What the steps cost the kernel in pages faulted in (the same
            # N/(2N-N) difference for murmur), so heap churn shows.
            "murmur_faults_per_step": max(f2 - f1, 0) / steps,
            "pytorch_faults_per_step": torch_faults,
        })  # fmt: skip
        print(f"  {bench.name} run {r + 1}/{args.runs}: murmur {runs[-1]['murmur_steps_per_s']:.1f}, "
              f"pytorch {torch_sps:.1f}, pytorch default {default_sps:.1f}"
              + (f", channels-last {nhwc_sps:.1f}" if nhwc_sps else "") + " steps/s", file=sys.stderr)  # fmt: skip
    keys = ("murmur_steps_per_s", "pytorch_steps_per_s", "pytorch_default_steps_per_s",
            "pytorch_channels_last_steps_per_s", "murmur_faults_per_step", "pytorch_faults_per_step")  # fmt: skip
    median = {k: statistics.median(run[k] for run in runs) for k in keys}
    return {
        **median,
        "ratio": median["murmur_steps_per_s"] / fastest_pytorch(median),
        "ratio_vs_foreach_false": median["murmur_steps_per_s"] / median["pytorch_steps_per_s"],
        "batch_size": bench.batch,
        "steps": steps,
        "parameters": params,
        "runs": runs,
    }


def fastest_pytorch(m):
    return max(m["pytorch_steps_per_s"], m["pytorch_default_steps_per_s"], m["pytorch_channels_last_steps_per_s"])


def cpu_model():
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def report(result):
    models, threads = result["models"], result["threads"]
    nhwc = {n: f"{m['pytorch_channels_last_steps_per_s']:.1f}" if m["pytorch_channels_last_steps_per_s"] else "n/a" for n, m in models.items()}
    rows = [
        f"| {name} | {m['batch_size']} | {m['murmur_steps_per_s']:.1f} | {m['pytorch_steps_per_s']:.1f} | "
        f"{m['pytorch_default_steps_per_s']:.1f} | {nhwc[name]} | {m['ratio']:.2f}x | "
        f"{m['murmur_faults_per_step']:.0f} / {m['pytorch_faults_per_step']:.0f} |"
        for name, m in models.items()
    ]
    met = [n for n, m in models.items() if m["ratio"] >= TARGET]
    missed = [n for n, m in models.items() if m["ratio"] < TARGET]
    verdict = (
        f"The {TARGET:.1f}x target is met for all models."
        if not missed
        else f"The {TARGET:.1f}x target is met for {', '.join(met) or 'no model'} and missed for {', '.join(missed)}."
    )
    ratios = "; ".join(
        f"{n} {m['ratio']:.2f}x ({m['murmur_steps_per_s']:.1f} vs {fastest_pytorch(m):.1f} steps/s)"
        for n, m in models.items()
    )
    paragraph = (
        f"Training throughput of `murmur train` relative to PyTorch {result['torch_version']} eager on the same model, "
        f"batch and AdamW settings, {threads} thread{'s' if threads > 1 else ''} on a {result['machine']['nproc']}-core "
        f"{result['machine']['cpu']}: {ratios}. {verdict} Each ratio is murmur's median over {result['runs']} runs "
        f"against the faster of PyTorch's `foreach=False` AdamW and its default AdamW (on CPU the default is "
        f"{result['pytorch_default_adamw']}), and for lenet also the default with its input channels-last, as murmur "
        f"lays it out; runs alternate between them. murmur's rate is N/(t(2N)-t(N)) from "
        f"`wall_seconds` of an N- and a 2N-step run, which leaves out start-up, data loading, the final evaluation and "
        f"the first, slower steps; PyTorch's is N steps timed after N/10 warm-up steps. Both include the per-step batch "
        f"gather, loss read-back, zero_grad, backward and optimizer step. Page faults per step are minor faults "
        f"(pages the kernel maps and zeroes), medians, measured the same way as each side's rate."
    )
    load = result["machine"]["load_average_at_start"]
    if load > 0.5:
        paragraph += f" Other work was running (load average {load:.1f} at start), so these numbers are noisy."
    table = [
        "| model | batch | murmur steps/s | PyTorch steps/s (foreach=False) | PyTorch steps/s (default) | PyTorch steps/s (default, channels-last input) | ratio | page faults per step, murmur / PyTorch |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    return "# Training throughput: murmur vs PyTorch eager\n\n" + "\n".join(table) + "\n\n" + paragraph + "\n"


def main():
    repo = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--murmur", default=str(repo / "target/release/murmur"), help="the murmur binary")
    p.add_argument("--out", type=Path, default=repo / "target/bench", help="where train.json and train.md go")
    threads = int(os.environ.get("MURMUR_THREADS", "1"))
    p.add_argument("--threads", type=int, default=threads, help="intra-op threads on both sides (default: $MURMUR_THREADS or 1)")
    p.add_argument("--runs", type=int, default=3, help="alternating runs per side; the median counts (default 3)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step count (e.g. 0.1 for a smoke test)")
    p.add_argument("--models", default="mlp,lenet,chargpt", help="comma-separated subset of mlp,lenet,chargpt")
    args = p.parse_args()
    data_dir = os.environ.get("MURMUR_DATA_DIR", str(repo.parent / "shared/data"))
    wanted = args.models.split(",")
    unknown = set(wanted) - {b.name for b in benches(data_dir)}
    if unknown or args.threads < 1 or args.runs < 1 or args.scale <= 0:
        p.error(f"--models takes mlp, lenet, chargpt (got {args.models}); --threads, --runs and --scale must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {
        "threads": args.threads,
        "runs": args.runs,
        "torch_version": torch.__version__,
        "pytorch_default_adamw": default_adamw_impl(),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()[0],
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="murmur-bench-") as tmp:
        for bench in benches(data_dir):
            if bench.name in wanted:
                result["models"][bench.name] = measure(args, bench, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report(result)
    (args.out / "train.md").write_text(text)
    print(text)
    print(f"bench: wrote {args.out / 'train.json'} and {args.out / 'train.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
