"""In-process A/B of the stage pairs (JAX_MOE_STAGE_PAIRS auto vs off), alternating."""
import os, sys, jax, numpy as np
import jax_moe
from jax_moe.testing import device_time
sys.path.insert(0, "tools")
from probe_moe import KW, deepseek_weights, token_sets
for t, e_loc in [(1, 256), (64, 32), (512, 32)]:
    w = deepseek_weights(e_loc)
    sets = token_sets(w, t)
    fns = {}
    for p in ("auto", "off"):
        os.environ["JAX_MOE_STAGE_PAIRS"] = p
        jax.clear_caches()
        f = jax.jit(lambda *a: jax_moe.fp8_block_scale_moe(*a, **KW))
        jax.block_until_ready(f(*sets[0]))
        fns[p] = f
    res = {p: [] for p in fns}
    for _ in range(7):
        for p, f in fns.items():
            res[p].append(device_time(f, sets, 30) * 1e3)
    print(f"T={t} E_loc={e_loc}: " + "  ".join(f"{p} median {np.median(v):.4f} min {min(v):.4f}" for p, v in res.items()), flush=True)
