"""Tile padding of the grouped GEMMs on the benchmark's routing (CPU is enough): for each
DeepSeek-V3 workload of benchmarks/bench_moe.py, the rows per local expert its first input set
routes (pure-JAX routing, same logits and bias as the benchmark) and the MMA rows a GEMM with
M tiles of 128, 64 or 32 rows runs (every expert's rows rounded up to a whole tile), relative to
the real rows. The routing bias makes the experts' loads uneven, so the padding is well above
what balanced routing would give.

    python tools/tile_padding.py
"""
import jax
import numpy as np

import jax_moe
from jax_moe import reference
from jax_moe.testing import random_moe_inputs

E, K = 256, 8
WORKLOADS = [(1, 256), (16, 256), (128, 256), (64, 32), (512, 32), (4096, 32), (16384, 32),
             (2048, 256), (8192, 256)]


def main():
    bias = random_moe_inputs(jax.random.PRNGKey(0), num_tokens=1, hidden_size=128,
                             intermediate_size=128, num_experts=E, local_num_experts=1).routing_bias
    print(f"{'T':>6} {'E_loc':>5} {'rows':>6} {'mean':>6} {'std':>6} {'max':>4}   padded/real at M tile 128 / 64 / 32")
    for t, e_loc in WORKLOADS:
        tok = random_moe_inputs(jax.random.PRNGKey(100), num_tokens=t, hidden_size=128,
                                intermediate_size=128, num_experts=E, local_num_experts=1)
        ids, _ = reference.route(tok.routing_logits, bias, top_k=K, n_group=8, topk_group=4,
                                 routed_scaling_factor=2.5,
                                 routing_method_type=jax_moe.RoutingMethodType.DeepSeekV3)
        n = np.bincount(np.asarray(ids).ravel(), minlength=E)[:e_loc]
        rows = max(int(n.sum()), 1)
        pads = [(np.ceil(n / m) * m).sum() / rows for m in (128, 64, 32)]
        print(f"{t:>6} {e_loc:>5} {rows:>6} {t * K / E:>6.1f} {n.std():>6.1f} {n.max():>4}   "
              + " / ".join(f"{p:.3f}" for p in pads))


if __name__ == "__main__":
    main()
