#!/usr/bin/env python3
"""PyTorch and `emb bench` side by side, on the same workloads, in one run.

PyTorch is not a dependency of the project: install it into a virtual environment of its own,
then run this script with that environment's Python from the repository root:

    python3 -m venv /tmp/torch-venv && /tmp/torch-venv/bin/pip install torch numpy
    cargo build --release
    /tmp/torch-venv/bin/python benches/torch_compare.py [--threads 2] [--rounds 3]

Each round times every PyTorch workload, then runs `emb bench --json` on the same one (same
table shape and dtype, uniform indices, same batch and bag size, same thread count), so both
figures come from the same minutes of a noisy machine. Rows/s are medians; the last column is
emb's rows/s over PyTorch's. The memcpy column is the bandwidth `emb bench` measured in the
same process (bytes read + written), for scale.
"""

import argparse
import json
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

M = 1 << 20


def timed(fn, iters, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_rate(w):
    """PyTorch's rows/s on workload `w`."""
    gen = torch.Generator().manual_seed(1)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[w["dtype"]]
    table = (torch.rand(w["rows"], w["dim"], generator=gen) * 2 - 1).to(dtype)
    idx = torch.randint(0, w["rows"], (w["batch"],), generator=gen, dtype=torch.int64)
    iters = w.get("iters", 11)
    op = w["torch"]
    if op == "index_select":
        out = torch.empty(w["batch"], w["dim"], dtype=dtype)
        t = timed(lambda: torch.index_select(table, 0, idx, out=out), iters)
    elif op == "embedding":
        t = timed(lambda: F.embedding(idx, table), iters)
    elif op == "embedding_max_norm":
        # Steady state: the warm-up calls rescale the rows in place, as a training step does.
        t = timed(lambda: F.embedding(idx, table, max_norm=1.0), iters)
    elif op == "embedding_bag":
        offsets = torch.arange(0, w["batch"], w["bag_size"], dtype=torch.int64)
        t = timed(lambda: F.embedding_bag(idx, table, offsets, mode=w["mode"]), iters)
    else:
        raise ValueError(op)
    return w["batch"] / t


def emb_rate(w, emb, threads):
    """`emb bench --json` on workload `w`: (rows/s, memcpy bytes/s, kernel)."""
    # PyTorch's OpenMP workers spin for a while after its last call: let them go to sleep
    # first, or they take the cores from the short workloads.
    time.sleep(1.0)
    cmd = [emb, "bench", "--json", "--threads", str(threads), "--rows", str(w["rows"]),
           "--dim", str(w["dim"]), "--dtype", w["dtype"], "--batch", str(w["batch"]),
           "--iters", str(w.get("iters", 11))] + w["emb"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return res["rows_per_s"], res["memcpy_bytes_per_s"], res["kernel"]


WORKLOADS = [
    # name, PyTorch call, emb bench arguments
    dict(name="lookup f32 4M x 64", torch="index_select", emb=[],
         rows=4 * M, dim=64, dtype="f32", batch=M),
    dict(name="lookup f32 4M x 64 (F.embedding)", torch="embedding", emb=[],
         rows=4 * M, dim=64, dtype="f32", batch=M),
    dict(name="lookup f16 4M x 64 -> f16", torch="index_select", emb=["--out-dtype", "native"],
         rows=4 * M, dim=64, dtype="f16", batch=M),
    dict(name="lookup f32 1M x 256", torch="index_select", emb=[],
         rows=M, dim=256, dtype="f32", batch=M),
    dict(name="lookup f32 4096 x 64, batch 4096", torch="index_select", emb=[],
         rows=4096, dim=64, dtype="f32", batch=4096, iters=2001),
    dict(name="bag sum f32 4M x 64, 32 per bag", torch="embedding_bag", mode="sum",
         emb=["--op", "bag", "--bag-size", "32", "--mode", "sum"],
         rows=4 * M, dim=64, dtype="f32", batch=M, bag_size=32),
    dict(name="bag max f32 4M x 64, 32 per bag", torch="embedding_bag", mode="max",
         emb=["--op", "bag", "--bag-size", "32", "--mode", "max"],
         rows=4 * M, dim=64, dtype="f32", batch=M, bag_size=32),
    dict(name="bag sum f16 4M x 64, 32 per bag", torch="embedding_bag", mode="sum",
         emb=["--op", "bag", "--bag-size", "32", "--mode", "sum", "--out-dtype", "native"],
         rows=4 * M, dim=64, dtype="f16", batch=M, bag_size=32),
    dict(name="max_norm=1 in place f32 4M x 64", torch="embedding_max_norm",
         emb=["--op", "renorm", "--renorm", "in-place"],
         rows=4 * M, dim=64, dtype="f32", batch=M, iters=3),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emb", default="target/release/emb")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="run only workloads whose name contains this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{args.threads} threads, {args.rounds} rounds")
    print("| workload | PyTorch | emb | memcpy | emb / PyTorch |")
    print("| --- | --- | --- | --- | --- |")
    for w in WORKLOADS:
        if args.only not in w["name"]:
            continue
        t_rates, e_rates, memcpys = [], [], []
        for _ in range(args.rounds):
            t_rates.append(torch_rate(w))
            rate, memcpy, kernel = emb_rate(w, args.emb, args.threads)
            e_rates.append(rate)
            memcpys.append(memcpy)
        t, e = statistics.median(t_rates), statistics.median(e_rates)
        print(f"| {w['name']} ({w['torch']}) | {t / 1e6:.1f} M rows/s | {e / 1e6:.1f} M rows/s "
              f"({kernel}) | {statistics.median(memcpys) / 1e9:.1f} GB/s | {e / t:.2f}× |",
              flush=True)


if __name__ == "__main__":
    main()
