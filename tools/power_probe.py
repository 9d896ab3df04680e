"""Sustained vs burst rates on the GPU, with the SM clock and board power sampled by nvidia-smi
(every 20 ms) during each phase: cuBLAS FP8 8192^3 GEMM (torch._scaled_mm) for the benchmark's
20 calls and for ~1 s of calls back to back, and the jitted op (256 local experts, each T of
--tokens, default 8192) for 20 and for 100 calls back to back. Tells whether the compute-bound workloads run power-capped at clocks the
20-call ceiling never sees.

    python tools/power_probe.py [--tokens 2048 8192] [--no-cublas]
"""
import argparse
import subprocess
import time

import jax
import numpy as np
import torch

import jax_moe
from probe_moe import KW, deepseek_weights, token_sets


def sampled(fn, label):
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                            "--format=csv,noheader,nounits", "-lms", "20"],
                           stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    t0 = time.perf_counter()
    work = fn()
    dt = time.perf_counter() - t0
    time.sleep(0.1)
    smi.terminate()
    rows = [l.split(",") for l in smi.communicate()[0].splitlines() if l.count(",") == 2]
    vals = np.array([[float(x) for x in r] for r in rows]) if rows else np.zeros((1, 3))
    busy = vals[vals[:, 1] > 150] if (vals[:, 1] > 150).any() else vals  # samples under load
    print(f"{label:34s} {work(dt):>18s}  SM clock median {np.median(busy[:, 0]):6.0f} MHz "
          f"(min {busy[:, 0].min():.0f})  power median {np.median(busy[:, 1]):5.0f} W "
          f"(max {busy[:, 1].max():.0f})  temp {busy[:, 2].max():.0f} C  [{len(busy)} samples]", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192], help="op workloads (256 local experts)")
    ap.add_argument("--no-cublas", action="store_true")
    args = ap.parse_args()
    if not args.no_cublas:
        cublas()
    w = deepseek_weights(256)
    for t in args.tokens:
        op(w, t)


def cublas():
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    gemm = lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    for _ in range(3):
        gemm()
    torch.cuda.synchronize()
    for reps in (20, 1200):
        def run(reps=reps):
            for _ in range(reps):
                gemm()
            torch.cuda.synchronize()
            return lambda dt: f"{2.0 * n ** 3 * reps / dt / 1e12:7.0f} TFLOP/s"
        sampled(run, f"cuBLAS FP8 8192^3 x {reps}")
    del a, b
    torch.cuda.empty_cache()


def op(w, t):
    sets = token_sets(w, t)
    f = jax.jit(lambda *x: jax_moe.fp8_block_scale_moe(*x, **KW))
    for i in range(3):
        jax.block_until_ready(f(*sets[i % 2]))
    time.sleep(2.0)
    for reps in (20, 100):
        def run(reps=reps):
            out = None
            for i in range(reps):
                out = f(*sets[i % 2])
            jax.block_until_ready(out)
            return lambda dt: f"{dt / reps * 1e3:7.3f} ms/call"
        sampled(run, f"op T={t} x {reps}")
        time.sleep(2.0)


if __name__ == "__main__":
    main()
