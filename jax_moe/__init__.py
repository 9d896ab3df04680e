"""jax_moe: DeepSeek-style FP8 block-scaled Mixture-of-Experts layers for JAX.

CUDA kernels (XLA FFI custom calls) on Hopper GPUs, the same API in pure JAX everywhere else.
"""
from . import reference
from ._native import cuda_available, cuda_status
from .api import MoEOutputs, fp8_block_scale_moe, fp8_block_scale_routed_moe, route
from .enums import ActivationType, RoutingMethodType
from .quant import (dequantize_activations, dequantize_weights, quantize_activations,
                    quantize_weights)
from .routing import pack_topk, unpack_topk

__version__ = "0.1.0"

__all__ = [
    "ActivationType", "MoEOutputs", "RoutingMethodType", "cuda_available", "cuda_status",
    "dequantize_activations", "dequantize_weights", "fp8_block_scale_moe",
    "fp8_block_scale_routed_moe", "pack_topk", "quantize_activations", "quantize_weights",
    "reference", "route", "unpack_topk",
]

# Differentiation (SPEC section 5): custom VJP of the public functions, float-input entries.
from . import grad  # noqa: E402
from .api import moe_bf16, routed_moe_bf16  # noqa: E402
from .routing import routing_weights  # noqa: E402

__all__ += ["grad", "moe_bf16", "routed_moe_bf16", "routing_weights"]

# Expert parallelism (SPEC section 4): inside shard_map, and ready mesh wrappers.
from . import parallel  # noqa: E402
from .parallel import (ep_moe, ep_routed_moe, expert_parallel_moe,  # noqa: E402
                       expert_parallel_routed_moe)

__all__ += ["parallel", "ep_moe", "ep_routed_moe", "expert_parallel_moe",
            "expert_parallel_routed_moe"]
