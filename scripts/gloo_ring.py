"""Decentralized SGD on a ring, hand-written on `torch.distributed` (gloo).

The script a researcher would write, and the baseline murmur's gossip is
held against: each rank trains `--local-steps` steps, then `isend`/`irecv`s
its flattened parameters with both ring neighbours and takes the average of
the three (Metropolis-Hastings weights, 1/3 each). One torch thread per rank.
Per round it times compute (the local steps) and communication (from their
end to the averaged parameters in place). Prints one JSON line.

Two tasks, matching murmur's:
- `lenet-mnist:DIR`: murmur's `lenet` on the 10,000 images of DIR, 2,000
  held out, the rest split among the ranks;
- `mlp-synthetic:H1,H2`: murmur's `mlp` (32 inputs, hidden layers H1 and H2,
  10 classes, ReLU) on 1,000 random examples a rank: only the cost of a step
  is compared, so the data need not be murmur's (accuracy is not reported).

The benches import `start` and `finish` (stdlib only, so a bench that runs
without torch can still launch this with a python that has it).

    python gloo_ring.py --rank R --world N --port P --task T --optimizer sgd:LR,MOMENTUM ...
"""

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path


def free_port():
    """A port of 127.0.0.1 free now, for a gloo rendezvous (every bench that runs gloo uses this one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(python, world, worker_args, env=None):
    """Launches the `world` ranks, meeting on a free port of 127.0.0.1; `worker_args` are the
    options besides rank, world and port."""
    port = free_port()
    script = str(Path(__file__).resolve())
    cmd = lambda rank: [python, "-W", "ignore", script, "--rank", str(rank), "--world", str(world),
                        "--port", str(port), *worker_args]
    return [subprocess.Popen(cmd(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for r in range(world)]


def finish(procs, timeout):
    """Waits for the ranks; returns each rank's JSON report, or raises with the first failure's stderr."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    for r, (p, (_, err)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise RuntimeError(f"gloo rank {r} failed ({p.returncode}): {err.strip()[-2000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("--rank", "--world", "--port", "--rounds", "--local-steps", "--batch"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--task", required=True, help="lenet-mnist:DIR or mlp-synthetic:H1,H2")
    p.add_argument("--optimizer", required=True, help="sgd:LR,MOMENTUM or adamw:LR,WEIGHT_DECAY")
    a = p.parse_args()

    import resource
    import time

    import torch
    import torch.distributed as dist
    import torch.nn as nn
    import torch.nn.functional as F

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=a.rank, world_size=a.world)
    task, _, arg = a.task.partition(":")
    torch.manual_seed(0)  # every rank starts from one model, as murmur's nodes do

    if task == "lenet-mnist":
        import gzip

        def idx(name):
            raw = gzip.open(f"{arg}/{name}", "rb").read()
            dims = raw[3]
            shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
            return torch.frombuffer(bytearray(raw[4 + 4 * dims:]), dtype=torch.uint8).reshape(shape)

        images = ((idx("t10k-images-idx3-ubyte.gz").float() / 255 - 0.1307) / 0.3081).unsqueeze(1)
        labels = idx("t10k-labels-idx1-ubyte.gz").long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        held, train = order[:2000], order[2000:]
        shard = train[a.rank::a.world]
        xs, ys = images[shard], labels[shard]

        class LeNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1, self.conv2 = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 32, 5)
                self.fc1, self.fc2 = nn.Linear(800, 128), nn.Linear(128, 10)

            def forward(self, x):
                x = F.max_pool2d(F.relu(self.conv1(x)), 2)
                x = F.max_pool2d(F.relu(self.conv2(x)), 2)
                return self.fc2(F.relu(self.fc1(x.flatten(1))))

        model = LeNet()
        held_out = (images[held], labels[held])
    elif task == "mlp-synthetic":
        widths = [32, *(int(h) for h in arg.split(",")), 10]
        layers = []
        for i, (w_in, w_out) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
        g = torch.Generator().manual_seed(a.rank)
        xs, ys = torch.randn(1000, 32, generator=g), torch.randint(0, 10, (1000,), generator=g)
        held_out = None
    else:
        sys.exit(f"gloo_ring: unknown task {a.task!r}")

    kind, _, values = a.optimizer.partition(":")
    lr, second = (float(v) for v in values.split(","))
    params = list(model.parameters())
    if kind == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=second)
    elif kind == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=second)
    else:
        sys.exit(f"gloo_ring: unknown optimizer {a.optimizer!r}")

    left, right = (a.rank - 1) % a.world, (a.rank + 1) % a.world
    g = torch.Generator().manual_seed(a.rank)
    perm, at = torch.randperm(len(ys), generator=g), 0
    compute, comm = [], []
    bufs = [torch.empty(sum(p.numel() for p in params)) for _ in range(2)]
    dist.barrier()
    begin = time.monotonic()
    for _ in range(a.rounds):
        t0 = time.monotonic()
        for _ in range(a.local_steps):
            if at + a.batch > len(ys):
                perm, at = torch.randperm(len(ys), generator=g), 0
            b = perm[at:at + a.batch]
            at += a.batch
            opt.zero_grad()
            F.cross_entropy(model(xs[b]), ys[b]).backward()
            opt.step()
        t1 = time.monotonic()
        flat = nn.utils.parameters_to_vector(params).detach()
        reqs = [dist.isend(flat, right), dist.isend(flat, left), dist.irecv(bufs[0], left), dist.irecv(bufs[1], right)]
        for q in reqs:
            q.wait()
        nn.utils.vector_to_parameters((flat + bufs[0] + bufs[1]) / 3, params)
        t2 = time.monotonic()
        compute.append(t1 - t0)
        comm.append(t2 - t1)
    loop = time.monotonic() - begin
    flat = nn.utils.parameters_to_vector(params).detach()
    dist.all_reduce(flat)
    nn.utils.vector_to_parameters(flat / a.world, params)
    accuracy = None
    if held_out is not None:
        with torch.no_grad():
            accuracy = (model(held_out[0]).argmax(1) == held_out[1]).float().mean().item()
    print(json.dumps({"rank": a.rank, "compute": compute, "comm": comm, "loop_seconds": loop, "accuracy": accuracy,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "parameters": flat.numel()}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
