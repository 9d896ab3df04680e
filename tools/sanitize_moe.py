"""The whole op's CUDA path on the GPU checked against the pure-JAX path on the *CPU*, for running
under compute-sanitizer: only the library's kernels (and XLA's small glue) run on the GPU, so
memcheck is not spent on -- or crashed by -- XLA's GPU kernels for the reference.

    compute-sanitizer --tool memcheck python tools/sanitize_moe.py     (see tools/sanitize.sh)

Cases: the ones of tests/test_gpu_moe.py that exercise bounds -- T in {0, 1, 7, 128}, local
slices with offset != 0, do_finalize=False, both routed forms with out-of-range ids, all tokens
on one expert, NaN logit rows. Exits 1 if a result is off (rel > 1e-2) or non-finite.
"""
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import ActivationType as A
from jax_moe import RoutingMethodType as R
from jax_moe.testing import random_moe_inputs

CPU = jax.devices("cpu")[0]
failures = []


def run(name, args, routed=False, rows=None, **static):
    f = jax_moe.fp8_block_scale_routed_moe if routed else jax_moe.fp8_block_scale_moe
    cu = jax.jit(functools.partial(f, backend="cuda", **static))(*args)
    with jax.default_device(CPU):
        xl = jax.jit(functools.partial(f, backend="xla", **static))(*jax.device_put(args, CPU))
    if isinstance(cu, jax_moe.MoEOutputs):
        cu, xl = cu.expert_outputs, xl.expert_outputs
    cu = np.asarray(jnp.asarray(cu, jnp.float32), np.float64)
    xl = np.asarray(jnp.asarray(xl, jnp.float32), np.float64)
    if rows is not None:
        cu, xl = cu[rows], xl[rows]
    rel = np.linalg.norm(cu - xl) / max(np.linalg.norm(xl), 1e-30) if cu.size else 0.0
    ok = np.isfinite(cu).all() and rel <= 1e-2
    print(f"sanitize-moe {name:40s} shape {str(cu.shape):16s} rel {rel:.2e} {'ok' if ok else 'FAIL'}",
          flush=True)
    if not ok:
        failures.append(name)


def inputs(seed, t, e, e_loc=None, act=A.Swiglu):
    return random_moe_inputs(jax.random.PRNGKey(seed), num_tokens=t, hidden_size=256,
                             intermediate_size=128, num_experts=e, local_num_experts=e_loc,
                             activation_type=act)


def main():
    ds = dict(top_k=8, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    for t in (0, 1, 7, 128):
        for e_loc in (8, 64):
            run(f"DeepSeekV3 T={t} E_loc={e_loc} offset={64 - e_loc}", inputs(t + e_loc, t, 64, e_loc),
                local_expert_offset=64 - e_loc, **ds)
    run("Relu2 T=33", inputs(1, 33, 32, act=A.Relu2), top_k=4, activation_type=A.Relu2,
        routing_method_type=R.Renormalize)
    run("do_finalize=False slice 16..32", inputs(2, 64, 32, 16), top_k=8, local_expert_offset=16,
        do_finalize=False, routing_method_type=R.Renormalize)

    t, e, k = 200, 32, 6
    args = inputs(3, t, e)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, e, (t, k)).astype(np.int32)
    ids[::5, 1] = e + 3
    ids[::7, 2] = e + 100
    ids[::3, 3] = -2
    w = jnp.asarray(rng.standard_normal((t, k)), jnp.bfloat16)
    rest = (args.routing_bias,) + tuple(args[2:])
    run("routed tuple, out-of-range ids", ((jnp.asarray(ids), w),) + rest, routed=True, top_k=k)
    ids[::3, 3] = 5
    run("routed packed, out-of-range ids", (jax_moe.pack_topk(ids, w),) + rest, routed=True, top_k=k)

    args = inputs(5, 512, 64)
    args = args._replace(routing_logits=jnp.asarray(args.routing_logits).at[:, 17].add(100.0))
    run("all tokens on expert 17", args, top_k=1, routing_method_type=R.TopK)

    args = inputs(6, 64, 32)
    args = args._replace(routing_logits=jnp.asarray(args.routing_logits).at[5].set(jnp.nan).at[9, 3].set(jnp.nan))
    keep = np.ones(64, bool)
    keep[[5, 9]] = False
    run("NaN logit rows (other rows compared)", args, rows=keep, top_k=4,
        routing_method_type=R.Renormalize)

    print(f"sanitize-moe: {len(failures)} failed" + (f": {failures}" if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
