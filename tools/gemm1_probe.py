"""Device time of the pipeline's GEMM1 stage alone (GEMM1 + activation + re-quantization) in its
variants, at the DeepSeek-V3 GEMM1 shape (N = 2*2048, K = 7168) and the benchmark's rows per
expert: split with CUTLASS's 128x128 tile, split with the own kernel (own128 / own64 tiles),
the GEMM alone with float32 or bf16 output, and fused (jax_moe_gemm1_act_quant, 128- or 64-row
tiles). TFLOP/s count the real rows. --gemm2 takes GEMM2's shape (N = 7168, K = 2048) for the
GEMM-alone variants.

    python tools/gemm1_probe.py [--reps 20] [--variants ...] [--shape G ROWS JITTER] [--gemm2]
"""
import argparse

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import ActivationType, ops, quant
from jax_moe.testing import device_time, random_expert_weights

N, K = 4096, 7168
SHAPES = [(256, 64), (32, 128), (256, 256), (32, 512)]  # (groups, mean rows per group)


def operands(key, g, rows, jitter):
    rng = np.random.default_rng(0)
    sizes = np.maximum(rng.normal(rows, jitter * rows, g).round(), 0).astype(int)
    offsets = jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]), jnp.int32)
    m = int(offsets[-1])
    ka, kb = jax.random.split(key)
    a, a_s = quant.quantize_activations(jax.random.normal(ka, (m, K), jnp.float32))
    b, b_s = random_expert_weights(kb, g, N, K)
    return (a, ops.rows_scales_to_grouped(a_s.T, offsets), b, b_s, offsets), m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=None)
    ap.add_argument("--shape", nargs=3, type=float, default=None, metavar=("GROUPS", "ROWS", "JITTER"))
    ap.add_argument("--gemm2", action="store_true", help="GEMM2's shape: N = 7168, K = 2048")
    ap.add_argument("--profile", action="store_true",
                    help="one call of each variant between cudaProfilerStart/Stop (ncu --profile-from-start off)")
    args = ap.parse_args()
    global N, K
    if args.gemm2:
        N, K = 7168, 2048
    act = ActivationType.Swiglu

    def split(tile):  # float32 GEMM with `tile`, then act_quant
        return lambda *x: ops.act_quant(ops.grouped_gemm_raw(*x, out_dtype=jnp.float32, tile=tile),
                                        ops.Plan(x[4], None, None), act)

    def gemm(tile, dtype):
        return lambda *x: ops.grouped_gemm_raw(*x, out_dtype=dtype, tile=tile)

    def fused(block_m):
        return lambda *x: ops.gemm1_act_quant_raw(*x, act, block_m)

    variants = {
        "split128": split("128"),
        "split_own": split("own128"),
        "split_own64": split("own64"),
        "cutlass_f32": gemm("128", jnp.float32),
        "cutlass_bf16": gemm("128", jnp.bfloat16),
        "own_f32": gemm("own128", jnp.float32),
        "own64_f32": gemm("own64", jnp.float32),
        "own_bf16": gemm("own128", jnp.bfloat16),
        "own64_bf16": gemm("own64", jnp.bfloat16),
        "fused128": fused(128),
        "fused64": fused(64),
    }
    fns = {k: jax.jit(v) for k, v in variants.items() if args.variants is None or k in args.variants}
    print("gemm1-probe  groups  rows  jitter " + "".join(f"{k:>16}" for k in fns) + "   (ms / TFLOP/s)")
    shapes = [(g, rows, j) for g, rows in SHAPES for j in (0.0, 0.2)]
    if args.shape:
        shapes = [(int(args.shape[0]), int(args.shape[1]), args.shape[2])]
    for g, rows, jitter in shapes:
        x, m = operands(jax.random.PRNGKey(g + rows), g, rows, jitter)
        if args.profile:
            import torch  # cudaProfilerStart/Stop on the primary context JAX shares
            for f in fns.values():
                jax.block_until_ready(f(*x))
            torch.cuda.init()
            torch.cuda.cudart().cudaProfilerStart()
            for f in fns.values():
                jax.block_until_ready(f(*x))
            torch.cuda.cudart().cudaProfilerStop()
            continue
        cells = []
        for f in fns.values():
            t = device_time(f, [x], args.reps)
            cells.append(f"{t * 1e3:8.3f}/{2 * m * N * K / t / 1e12:5.0f}")
        print(f"gemm1-probe  {g:6d}  {rows:4d}  {jitter:6.1f} " + "".join(f"{c:>16}" for c in cells),
              flush=True)
        del x


if __name__ == "__main__":
    main()
