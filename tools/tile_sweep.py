"""Device time of the jitted fp8_block_scale_moe for every grouped-GEMM tile config, at the
DeepSeek-V3 workloads of bench_moe.py, in one process per expert count. The config is the
GEMM's `tile` attribute, taken from JAX_MOE_GEMM_TILE when the op is traced, so every config
gets its own trace (jax.clear_caches()). An entry TILE/MODE also sets JAX_MOE_GEMM1 to MODE
(fused, fused128, fused64: GEMM1 + act_quant in one kernel; split: GEMM1 with TILE, then
act_quant).

    python tools/tile_sweep.py [--tiles auto 64 128 swap32 auto/fused auto/split] [--reps 20]
"""
import argparse
import os

import jax

import jax_moe
from jax_moe import api, ops
from jax_moe.testing import device_time
from probe_moe import E, KW, deepseek_weights, token_sets  # tools/ is the script's directory

WORKLOADS = {256: [1, 16, 128, 2048, 8192], 32: [64, 512, 4096, 16384]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", nargs="+", default=["auto", "64", "128", "swap32"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--local-experts", type=int, nargs="+", default=[256, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="these T instead of the benchmark's")
    args = ap.parse_args()
    print("tile-sweep  E_loc      T  rows/grp  " + "  ".join(f"{t:>8}" for t in args.tiles) + "   (ms)")
    for e_loc in args.local_experts:
        w = deepseek_weights(e_loc)
        fn = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **KW))
        for t in args.tokens or WORKLOADS[e_loc]:
            sets = token_sets(w, t)
            ms = []
            for entry in args.tiles:
                tile, _, gemm1 = entry.partition("/")
                for var, value in ((ops.TILE_ENV, tile), (ops.GEMM1_ENV, gemm1 or "auto")):
                    if value == "auto":
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = value
                jax.clear_caches()
                ms.append(device_time(fn, sets, args.reps) * 1e3)
            os.environ.pop(ops.TILE_ENV, None)
            os.environ.pop(ops.GEMM1_ENV, None)
            rows = api.expected_rows_per_expert(t, KW["top_k"], E)
            print(f"tile-sweep  {e_loc:5d}  {t:5d}  {rows:8.1f}  " + "  ".join(f"{m:8.3f}" for m in ms),
                  flush=True)


if __name__ == "__main__":
    main()
