import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_ENABLE_X64", "0")


def pytest_collection_modifyitems(config, items):
    import jax_moe
    ok, why = jax_moe.cuda_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"CUDA path unavailable: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
