"""Tile padding of the grouped GEMMs on the benchmark's routing (CPU is enough): for each
DeepSeek-V3 workload of benchmarks/bench_moe.py, the rows per local expert its first input set
routes (same logits and selection bias as the benchmark) and the MMA rows a GEMM with M tiles of
128, 64 or 32 rows runs (every expert's rows rounded up to a whole tile), relative to the real
rows. The benchmark's random selection bias (0.01 * N(0, 1), testing.random_moe_inputs) makes
the experts' loads far more uneven than unbiased routing would (std 51 vs 16 rows at T=8192).

    python tools/tile_padding.py
"""
import jax
import numpy as np

import jax_moe
from jax_moe import api
from jax_moe.testing import random_moe_inputs
from probe_moe import E, KW  # tools/ is the script's directory
from tile_sweep import WORKLOADS


def main():
    # the bias depends only on the key and E, so small sizes give the benchmark's bias
    small = dict(hidden_size=128, intermediate_size=128, num_experts=E, local_num_experts=1)
    bias = random_moe_inputs(jax.random.PRNGKey(0), num_tokens=1, **small).routing_bias
    print(f"{'T':>6} {'E_loc':>5} {'rows':>6} {'mean':>6} {'std':>6} {'max':>4}   padded/real at M tile 128 / 64 / 32")
    for e_loc, tokens in WORKLOADS.items():
        for t in tokens:
            logits = random_moe_inputs(jax.random.PRNGKey(100), num_tokens=t, **small).routing_logits
            ids, _ = jax_moe.route(logits, bias, **KW, backend="xla")
            n = np.bincount(np.asarray(ids).ravel(), minlength=E)[:e_loc]
            rows = max(int(n.sum()), 1)
            pads = [(np.ceil(n / m) * m).sum() / rows for m in (128, 64, 32)]
            print(f"{t:>6} {e_loc:>5} {rows:>6} {api.expected_rows_per_expert(t, KW['top_k'], E):>6.1f} {n.std():>6.1f} {n.max():>4}   "
                  + " / ".join(f"{p:.3f}" for p in pads))


if __name__ == "__main__":
    main()
