"""Random, realistic MoE layer inputs (for the main job, benchmarks and tests).

Hidden states and weights are drawn N(0, 1)/sqrt(fan_in) and quantized to FP8 with 128-blocks,
like trained weights; never zeros or ones. Weights are generated one expert at a time on the
device, so the DeepSeek-V3 shape (11 GB of FP8 expert weights) never needs a float32 copy.
"""
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import quant
from .enums import ActivationType, is_gated


class MoEInputs(NamedTuple):
    routing_logits: jax.Array
    routing_bias: jax.Array
    hidden_states: jax.Array
    hidden_states_scale: jax.Array
    gemm1_weights: jax.Array
    gemm1_weights_scale: jax.Array
    gemm2_weights: jax.Array
    gemm2_weights_scale: jax.Array


def random_expert_weights(key, num_experts, n, k):
    """FP8 [E, N, K] and scales [E, N/128, K/128], generated expert by expert on the device."""
    def one(key):
        w = jax.random.normal(key, (n, k), jnp.float32) / np.sqrt(k)
        return quant.quantize_weights(w)
    return jax.jit(lambda keys: jax.lax.map(one, keys))(jax.random.split(key, num_experts))


def random_moe_inputs(key, *, num_tokens, hidden_size, intermediate_size, num_experts,
                      local_num_experts=None, activation_type=ActivationType.Swiglu,
                      logits_dtype=jnp.float32):
    e_loc = num_experts if local_num_experts is None else local_num_experts
    k_logit, k_bias, k_x, k_w1, k_w2 = jax.random.split(key, 5)
    logits = jax.random.normal(k_logit, (num_tokens, num_experts), jnp.float32).astype(logits_dtype)
    # a small selection bias, as a trained load-balancing bias keeps routing near uniform
    bias = 0.01 * jax.random.normal(k_bias, (num_experts,), jnp.float32)
    x = jax.random.normal(k_x, (num_tokens, hidden_size), jnp.float32)
    xq, xs = quant.quantize_activations(x)
    rows1 = (2 if is_gated(activation_type) else 1) * intermediate_size
    w1, w1s = random_expert_weights(k_w1, e_loc, rows1, hidden_size)
    w2, w2s = random_expert_weights(k_w2, e_loc, hidden_size, intermediate_size)
    return MoEInputs(logits, bias, xq, xs, w1, w1s, w2, w2s)


def median_time(fn, arg_sets, reps, warmup=3):
    """Seconds per call of `fn`, each call synchronized: (median, 10th, 90th percentile) over
    `reps` calls after `warmup` calls, rotating through `arg_sets` (a list of argument tuples)."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.percentile(times, 10)), float(np.percentile(times, 90))


def device_time(fn, arg_sets, reps, batches=5, warmup=3, with_batch_time=False,
                sync=None):
    """Seconds per call of `fn` in steady state, calls enqueued back to back (JAX's async dispatch
    keeps the GPU fed, as inside a model) over rotating `arg_sets`: a batch of `reps` calls and one
    of 2 * `reps`, each with one sync at its end; the difference of the two over `reps` is the
    time per call with what every batch pays once cancelled (the host's dispatch of the first
    call before the GPU starts, the wake-up after the final sync: together ~0.2-0.4 ms on an
    H100 host, 10-20 us per call at 20 calls). Median over `batches` such pairs. Unlike
    `median_time`, the host's per-call dispatch and synchronization latency is hidden whenever
    the device is the slower side. `with_batch_time`: also return the plain batch figure (the
    `reps` batch's time / `reps`, fixed cost included), median over the same batches. `sync`
    waits for a call's output (default jax.block_until_ready; another framework's
    synchronization for its calls)."""
    sync = sync or jax.block_until_ready
    for i in range(warmup):
        sync(fn(*arg_sets[i % len(arg_sets)]))

    def batch(n):
        t0 = time.perf_counter()
        out = None
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        sync(out)
        return time.perf_counter() - t0

    steady, plain = [], []
    for _ in range(batches):
        short = batch(reps)
        steady.append((batch(2 * reps) - short) / reps)
        plain.append(short / reps)
    if with_batch_time:
        return float(np.median(steady)), float(np.median(plain))
    return float(np.median(steady))
