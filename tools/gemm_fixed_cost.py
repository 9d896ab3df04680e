"""The own kernel's grouped GEMM (own64 tiles) alone at DeepSeek-V3's GEMM1 and GEMM2 shapes with
1 and 16 rows per group: device time against the number of groups (bytes of weights), to
separate a per-call fixed cost (the intercept) from the streaming rate (the slope). Every call
reads other weights than the last (up to 4 sets), so the L2 does not hold them.

Caveat (RESULTS.md, eleventh session): `device_time` of single GEMM calls back to back is
host-bound below ~100 us per call on these hosts, so the small-group points (and the intercept
fitted through them) overstate the kernel's cost; tools/kernel_times.py's CUPTI records give
the kernel's own duration (GEMM1 8 groups x 1 row: 84 us, ~6-7 us above the streaming rate).

    python tools/gemm_fixed_cost.py
"""
import jax
import jax.numpy as jnp

from jax_moe import ops, quant
from jax_moe.testing import device_time, random_expert_weights

MAX_GROUPS = 64


def main():
    for name, n, k, out_dtype in (("GEMM1", 4096, 7168, jnp.float32), ("GEMM2", 7168, 2048, jnp.bfloat16)):
        w, w_scale = random_expert_weights(jax.random.PRNGKey(1), MAX_GROUPS, n, k)
        gemm = jax.jit(lambda *x: ops.grouped_gemm_raw(*x, out_dtype=out_dtype, tile="own64"))
        for rows in (1, 16):
            for g in (2, 4, 8, 16, 32, 64):
                offsets = jnp.arange(g + 1, dtype=jnp.int32) * rows
                a, a_s = quant.quantize_activations(jax.random.normal(jax.random.PRNGKey(g), (g * rows, k)))
                a_s = ops.rows_scales_to_grouped(a_s.T, offsets)
                sets = [(a, a_s, w[i * g:(i + 1) * g], w_scale[i * g:(i + 1) * g], offsets)
                        for i in range(min(4, MAX_GROUPS // g))]
                t = device_time(gemm, sets, 30)
                weight_bytes = g * n * k
                print(f"{name} rows {rows:2d} groups {g:3d} tiles {g * (n // 256):5d} weights "
                      f"{weight_bytes / 1e6:8.1f} MB  {t * 1e6:8.1f} us  {weight_bytes / t / 1e12:5.2f} TB/s",
                      flush=True)


if __name__ == "__main__":
    main()
