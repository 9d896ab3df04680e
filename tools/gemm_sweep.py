"""Device time of `jax_moe_grouped_gemm` alone at the GEMM shapes of the compute-heavy
DeepSeek-V3 workloads (equal rows per group), per tile config and tile-scheduler setting.
Needs an experiment build for the configs beyond ops.GEMM_TILES and for the scheduler knobs
(GEMM_EXPERIMENTS=ON bash tools/gpu_build.sh):

    python tools/gemm_sweep.py [--tiles 128 128m2 128m2n2] [--sched M1 N1 M4] [--reps 20]

A scheduler setting is raster order (M or N) + max swizzle, read by the handler from
JAX_MOE_EXP_RASTER / JAX_MOE_EXP_SWIZZLE at each call (experiment builds only).
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import ops, quant
from jax_moe.testing import device_time, random_expert_weights

EXPERIMENT_TILES = {"128m2": 4, "128m2n2": 5, "swap128": 20}

# (workload, groups, rows per group, N, K, output dtype)
SHAPES = [
    ("prefill8192 gemm1", 256, 256, 4096, 7168, jnp.float32),
    ("prefill8192 gemm1", 256, 256, 4096, 7168, jnp.bfloat16),
    ("prefill8192 gemm2", 256, 256, 7168, 2048, jnp.bfloat16),
    ("ep16384 gemm1", 32, 512, 4096, 7168, jnp.float32),
    ("ep16384 gemm2", 32, 512, 7168, 2048, jnp.bfloat16),
    ("ep4096 gemm1", 32, 128, 4096, 7168, jnp.float32),
    ("prefill2048 gemm1", 256, 64, 4096, 7168, jnp.float32),
]


def operands(g, rows, n, k, seed=0):
    """Grouped-GEMM operands of `g` groups of `rows` token rows: realistic FP8 tokens and weights
    (jax_moe.testing), token scales in the kernel's grouped layout, offsets."""
    ka, kb = jax.random.split(jax.random.PRNGKey(seed))
    off = jnp.asarray(np.arange(g + 1) * rows, jnp.int32)
    a, a_s = quant.quantize_activations(jax.random.normal(ka, (g * rows, k), jnp.float32))
    b, b_s = random_expert_weights(kb, g, n, k)
    return a, ops.rows_scales_to_grouped(a_s.T, off), b, b_s, off


def check(tiles):
    """Every config against the default 128x128 one on uneven groups (empty, 1 row, 300 rows)."""
    off = jnp.asarray([0, 0, 1, 301, 301 + 130, 301 + 130 + 257], jnp.int32)
    a, a_s, b, b_s, _ = operands(5, 160, 512, 1024, seed=1)
    ref = np.asarray(ops.grouped_gemm_raw(a, a_s, b, b_s, off, out_dtype=jnp.float32, tile="128"))
    rows = int(off[-1])
    for tile in tiles:
        for sched in ("0", "1"):
            os.environ["JAX_MOE_EXP_RASTER"] = sched
            d = np.asarray(ops.grouped_gemm_raw(a, a_s, b, b_s, off, out_dtype=jnp.float32, tile=tile))
            err = np.abs(d[:rows] - ref[:rows]).max() / np.abs(ref[:rows]).max()
            print(f"gemm-sweep check {tile} raster {sched}: max rel diff {err:.2e}",
                  "ok" if err < 1e-5 else "MISMATCH", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", nargs="+", default=["128", "128m2", "128m2n2"])
    ap.add_argument("--sched", nargs="+", default=["M1", "N1", "M4"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="", help="only the shapes whose name contains this")
    args = ap.parse_args()
    ok, why = jax_moe.cuda_status()
    if not ok:
        raise SystemExit(f"CUDA path unavailable: {why}")
    ops.GEMM_TILES.update(EXPERIMENT_TILES)
    combos = [(t, s) for t in args.tiles for s in args.sched]
    check(args.tiles)
    print("gemm-sweep  " + f"{'shape':<18} {'out':>4}  " +
          "  ".join(f"{t + '/' + s:>12}" for t, s in combos) + "   (TFLOP/s)", flush=True)
    for name, g, rows, n, k, dt in SHAPES:
        if args.only not in name:
            continue
        opnds = operands(g, rows, n, k)
        flops = 2.0 * g * rows * n * k
        cells = []
        for tile, sched in combos:
            os.environ["JAX_MOE_EXP_RASTER"] = "1" if sched[0] == "N" else "0"
            os.environ["JAX_MOE_EXP_SWIZZLE"] = sched[1:]
            fn = jax.jit(lambda *x, tile=tile: ops.grouped_gemm_raw(*x, out_dtype=dt, tile=tile))
            try:
                t = device_time(fn, [opnds], args.reps)
                cells.append(f"{flops / t / 1e12:12.0f}")
            except Exception as e:  # noqa: BLE001 - report and go on with the sweep
                cells.append(f"{'err':>12}")
                print(f"gemm-sweep error {name} {tile}/{sched}: {str(e)[:200]}", flush=True)
        print(f"gemm-sweep  {name:<18} {jnp.dtype(dt).name[:4]:>4}  " + "  ".join(cells), flush=True)
        del opnds


if __name__ == "__main__":
    main()
