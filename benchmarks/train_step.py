"""This machine's limits and the in-batch softmax step measured against them.

    .venv/bin/python benchmarks/train_step.py [--out benchmarks/results/train_step.json]

1. Matrix-multiply GFLOP/s (float32, 2048^3) at 1 and at all threads; memory read bandwidth
   (sum over a 512 MB array).
2. The in-batch step at B = 1024 and 4096, d = 64: user and item vectors -> logQ-corrected,
   accidental-hit-masked sampled softmax -> gradients of both vector sets, two ways:
   ``fused``, the trainer's ``losses.shared_softmax_loss`` (the score product inside, rows in
   blocks, no [B, B] matrix stored), and ``composed``, plain autograd: scores = u @ v.T, the
   correction subtracted, the hits filled with -inf, ``F.cross_entropy`` (the [B, B] matrix in
   memory; the tests' reference). FLOPs counted as 6 * B^2 * d
   (one product forward, two backward); achieved GFLOP/s as a share of the matrix-multiply limit
   measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from twotower.training import losses


def best_of(fn, repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_gflops(threads: int, n: int = 2048) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = best_of(lambda: a @ b)
    return 2 * n**3 / t / 1e9


def read_bandwidth_gbs(mb: int = 512) -> float:
    x = torch.ones(mb * 1024 * 1024 // 4)
    t = best_of(lambda: x.sum())
    return x.numel() * 4 / t / 1e9


def in_batch_step(b: int, how: str, d: int = 64, tau: float = 0.1) -> dict:
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_()
    v = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_()
    items = torch.randint(0, 40_000, (b,))
    log_q = losses.log_expected_count(torch.full((40_000,), 1 / 40_000)[items], b)
    target = torch.arange(b)

    def fused():
        hits = losses.accidental_hits(items, items, target)
        losses.shared_softmax_loss(u / tau, v, losses.LogitInputs(target, -log_q, excluded=hits)).backward()
        u.grad = v.grad = None

    def composed():
        scores = (u / tau) @ v.T - log_q
        mask = losses.accidental_hit_mask(items, items, target)
        F.cross_entropy(scores.masked_fill(mask, float("-inf")), target).backward()
        u.grad = v.grad = None

    t = best_of(fused if how == "fused" else composed, repeat=10, warmup=3)
    flops = 6 * b * b * d
    return {"loss": how, "batch": b, "dim": d, "seconds": t, "gflops": flops / t / 1e9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args()
    all_threads = torch.get_num_threads()
    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "threads": all_threads}
    res["matmul_gflops_1_thread"] = matmul_gflops(1)
    res["matmul_gflops_all_threads"] = matmul_gflops(all_threads)
    torch.set_num_threads(all_threads)
    res["read_bandwidth_gbs"] = read_bandwidth_gbs()
    res["steps"] = [in_batch_step(b, how) for how in ("fused", "composed") for b in (1024, 4096)]
    for s in res["steps"]:
        s["share_of_matmul_limit"] = s["gflops"] / res["matmul_gflops_all_threads"]
    print(f"matmul: {res['matmul_gflops_1_thread']:.1f} GFLOP/s on 1 thread, "
          f"{res['matmul_gflops_all_threads']:.1f} on {all_threads}; read bandwidth {res['read_bandwidth_gbs']:.1f} GB/s")
    for s in res["steps"]:
        print(f"{s['loss']} in-batch step B={s['batch']} d={s['dim']}: {s['seconds'] * 1e3:.1f} ms, {s['gflops']:.1f} GFLOP/s "
              f"(6*B^2*d), {100 * s['share_of_matmul_limit']:.0f} % of the matmul limit")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
