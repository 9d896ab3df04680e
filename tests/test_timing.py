"""`testing.device_time`, the benchmark's clock: its steady-state figure must cancel what each
timed batch pays once (first dispatch, final sync) and keep the per-call cost."""
import time

import jax.numpy as jnp

from jax_moe import testing


def test_device_time_cancels_the_fixed_cost_of_a_batch(monkeypatch):
    # Sleeps overshoot on a loaded CI machine (seen: +0.6 ms per 2 ms sleep on 2 cores), so the
    # fixed cost is made large (10 ms per call when spread over a batch) and the tolerance loose
    # (2 ms): a clock that did not cancel the fixed cost would still be 8 ms off.
    per_call, fixed = 0.002, 0.100
    real_sync = testing.jax.block_until_ready

    def slow_sync(x):  # every batch ends in one sync: 100 ms of fixed cost per batch
        time.sleep(fixed)
        return real_sync(x)

    monkeypatch.setattr(testing.jax, "block_until_ready", slow_sync)
    x = jnp.ones((4,))

    def fn(a):
        time.sleep(per_call)
        return a

    reps = 10
    steady, batch = testing.device_time(fn, [(x,)], reps, batches=3, warmup=1, with_batch_time=True)
    tolerance = 2e-3
    assert abs(steady - per_call) < tolerance, steady
    # the plain batch figure carries the fixed cost spread over reps calls (+10 ms here)
    assert batch > per_call + 0.8 * fixed / reps, batch
    assert testing.device_time(fn, [(x,)], reps, batches=1, warmup=0) < per_call + tolerance
