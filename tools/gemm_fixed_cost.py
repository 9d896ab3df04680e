"""The own kernel's grouped GEMM (own64 tiles) alone at DeepSeek-V3's GEMM1 and GEMM2 shapes with
1 and 16 rows per group: device time against the number of groups (bytes of weights), to
separate a per-call fixed cost (the intercept) from the streaming rate (the slope). Every call
reads other weights than the last (up to 4 sets), so the L2 does not hold them.

    python tools/gemm_fixed_cost.py
"""
import jax, jax.numpy as jnp, numpy as np
from jax_moe import ops, quant
from jax_moe.testing import device_time, random_expert_weights
for name, n, k in (("GEMM1", 4096, 7168), ("GEMM2", 7168, 2048)):
    wall = random_expert_weights(jax.random.PRNGKey(1), 64, n, k)
    for rows in (1, 16):
        for g in (2, 4, 8, 16, 32, 64):
            nsets = min(4, 64 // g)  # different weights per call: L2 does not hold them
            offsets = jnp.arange(g + 1, dtype=jnp.int32) * rows
            m = g * rows
            a, a_s = quant.quantize_activations(jax.random.normal(jax.random.PRNGKey(g), (m, k)))
            a_s = ops.rows_scales_to_grouped(a_s.T, offsets)
            f = jax.jit(lambda *x: ops.grouped_gemm_raw(*x, out_dtype=jnp.float32 if name == "GEMM1" else jnp.bfloat16, tile="own64"))
            sets = [(a, a_s, wall[0][i * g:(i + 1) * g], wall[1][i * g:(i + 1) * g], offsets) for i in range(nsets)]
            b = sets[0][2]
            t = device_time(f, sets, 30)
            tiles = g * (n // 256)
            print(f"{name} rows {rows:2d} groups {g:3d} tiles {tiles:5d} weights {b.size/1e6:8.1f} MB  {t*1e6:8.1f} us  {b.size/t/1e12:5.2f} TB/s", flush=True)
