"""Quick timing of `jax_moe_grouped_gemm` (not a test): median of 20 runs after warm-up.

  PYTHONPATH=. python benchmarks/bench_gemm.py   # all workloads, automatic config
  JAX_MOE_GEMM_TILE=64 python ...            # force a config (64 or 128 rows per tile)

Workloads (DeepSeek-V3 GEMM1-like, N=4096, K=7168):
  prefill: G=32, 1024 rows per group -> TFLOP/s (2*M*N*K / t)
  decode : G=256, 16 rows per group  -> GB/s of weights read (G*N*K fp8 + scales) / t
"""
import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import ops


def _random_fp8(key, shape):
    # random bytes with bit 6 cleared: exponent <= 7, so never NaN; |x| < 2. Drawn for the last
    # two axes and tiled over the leading ones (keeps the RNG's temporaries small).
    bits = jax.random.bits(key, shape[-2:], jnp.uint8) & jnp.uint8(0xBF)
    bits = jnp.broadcast_to(bits, shape) + jnp.zeros(shape, jnp.uint8)  # materialized copy
    return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)


def _time(fn, args, iters=20, warmup=3):
    """(median of `iters` individually synchronized calls, mean of `iters` back-to-back calls)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    return statistics.median(ts), (time.perf_counter() - t0) / iters


def run(g, rows_per_group, n, k, seed=0):
    m = g * rows_per_group
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    a = jax.jit(_random_fp8, static_argnums=1)(ks[0], (m, k))
    b = jax.jit(_random_fp8, static_argnums=1)(ks[1], (g, n, k))
    a_s = jax.random.uniform(ks[2], (m * k // 128,), jnp.float32, 1e-3, 2e-3)
    b_s = jax.random.uniform(ks[3], (g, n // 128, k // 128), jnp.float32, 1e-3, 2e-3)
    off = jnp.asarray(np.arange(g + 1) * rows_per_group, jnp.int32)
    fn = jax.jit(ops.grouped_gemm_raw)
    t, t_pipe = _time(fn, (a, a_s, b, b_s, off))
    flops = 2.0 * m * n * k
    wbytes = g * n * k + b_s.size * 4
    return t, flops / t / 1e12, wbytes / t / 1e9, t_pipe


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=7168)
    args = p.parse_args()
    ok, why = jax_moe.cuda_status()  # also registers the FFI targets with XLA
    if not ok:
        raise SystemExit(f"CUDA path unavailable: {why}")
    tile = os.environ.get("JAX_MOE_GEMM_TILE", "auto")
    print(f"device: {jax.devices()[0].device_kind}, tile: {tile}")
    for name, g, rpg in [("prefill", 32, 1024), ("decode", 256, 16), ("mid", 32, 64),
                         ("mid", 32, 128), ("mid", 256, 128)]:
        t, tflops, gbs, t_pipe = run(g, rpg, args.n, args.k)
        print(f"{name:8s} G={g:3d} rows/group={rpg:5d} N={args.n} K={args.k}: {t * 1e3:8.3f} ms "
              f"{tflops:7.1f} TFLOP/s {gbs:7.1f} GB/s(weights) | back-to-back {t_pipe * 1e3:8.3f} ms",
              flush=True)


if __name__ == "__main__":
    main()
