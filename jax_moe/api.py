"""The public MoE functions: validate once, choose the backend, run the stages.

Stages (ARCHITECTURE.md): route -> plan -> permute -> gemm1 -> act_quant -> gemm2 -> finalize
(gemm1 + act_quant one stage: the CUDA path may fuse them).
`reference` implements them in pure JAX, `ops` as CUDA custom calls; both share this driver.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import _checks, _native, grad, ops, quant, reference
from .enums import ActivationType, RoutingMethodType
from .routing import unpack_topk


class MoEOutputs(NamedTuple):
    """Result of `do_finalize=False`."""
    expert_outputs: jax.Array  # bf16 [T, k, H], GEMM2 output of expert topk_ids[t, j], unweighted
    topk_weights: jax.Array  # [T, k]
    topk_ids: jax.Array  # int32 [T, k]


# CUDA routing kernel limits (larger configurations route in pure JAX under backend="auto").
CUDA_ROUTE_MAX_EXPERTS = 512
CUDA_ROUTE_MAX_TOPK = 32
CUDA_ROUTE_MAX_TOPK_DEEPSEEK = 8
CUDA_ROUTE_MAX_GROUPS = 8
CUDA_ROUTE_MAX_GROUP_SIZE = 32

# Dtypes the float-input entries (`moe_bf16`, `routed_moe_bf16`) accept for hidden_states.
FLOAT_HIDDEN = (jnp.bfloat16, jnp.float16, jnp.float32)


def _use_cuda(backend):
    backend = _checks.backend_name(backend)
    if backend == "xla":
        return False
    ok, why = _native.cuda_status()
    if backend == "cuda" and not ok:
        raise RuntimeError(f"backend='cuda': the CUDA path is not available here: {why}")
    return ok


def _cuda_route_supported(num_experts, top_k, method, n_group):
    if num_experts > CUDA_ROUTE_MAX_EXPERTS:
        return f"num_experts {num_experts} > {CUDA_ROUTE_MAX_EXPERTS}"
    limit = CUDA_ROUTE_MAX_TOPK_DEEPSEEK if method == RoutingMethodType.DeepSeekV3 else CUDA_ROUTE_MAX_TOPK
    if top_k > limit:
        return f"top_k {top_k} > {limit} for {method.name}"
    if n_group and n_group > 1:
        if n_group > CUDA_ROUTE_MAX_GROUPS or num_experts // n_group > CUDA_ROUTE_MAX_GROUP_SIZE:
            return (f"n_group {n_group} with {num_experts // n_group} experts per group "
                    f"(limits {CUDA_ROUTE_MAX_GROUPS}, {CUDA_ROUTE_MAX_GROUP_SIZE})")
    return None


def route(routing_logits, routing_bias=None, *, top_k, num_experts=None, n_group=None,
          topk_group=None, routed_scaling_factor=None,
          routing_method_type=RoutingMethodType.DeepSeekV3, backend="auto"):
    """Routing of SPEC section 2: logits [T, E] (+ bias [E]) -> (topk_ids int32 [T, k],
    topk_weights bfloat16 [T, k])."""
    method = _checks.routing_method(routing_method_type)
    e = _checks.check_logits(routing_logits, routing_bias, num_experts)
    top_k, n_group, topk_group, rsf = _checks.check_routing(
        e, top_k, method, n_group, topk_group, routed_scaling_factor)
    return _route(routing_logits, routing_bias, top_k, method, n_group, topk_group, rsf,
                  _use_cuda(backend), strict=backend == "cuda")


def _route(logits, bias, top_k, method, n_group, topk_group, rsf, use_cuda, strict):
    kwargs = dict(top_k=top_k, routing_method_type=method, n_group=n_group,
                  topk_group=topk_group, routed_scaling_factor=rsf)
    if bias is not None and method not in (RoutingMethodType.DeepSeekV3, RoutingMethodType.MiniMax2):
        bias = None  # only DeepSeekV3 and MiniMax2 select with a bias
    if use_cuda and logits.shape[0] > 0:
        unsupported = _cuda_route_supported(logits.shape[1], top_k, method, n_group)
        if unsupported is None:
            return ops.route(logits, bias, **kwargs)
        if strict:
            raise NotImplementedError(f"backend='cuda': routing not supported by the CUDA kernel: {unsupported}")
    return reference.route(logits, bias, **kwargs)


def expected_rows_per_expert(num_tokens, top_k, num_experts):
    """The GEMMs' tiling hint: T*k/E rows per local expert under balanced routing (with a local
    slice, M/G would count the rows of other devices' experts too)."""
    return num_tokens * top_k / num_experts


def run_experts(stages, topk_ids, topk_weights, hidden_states, hidden_states_scale, gemm1_weights,
                gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, num_experts,
                local_expert_offset, activation_type, do_finalize, plan=None):
    """Steps 1-6 of SPEC section 3 given the routing, with `stages` = `reference` or `ops` (and
    the plan, where `ops.route_plan` made it with the routing)."""
    t, k = topk_ids.shape
    h = hidden_states.shape[1]
    if t == 0:
        if do_finalize:
            return jnp.zeros((0, h), jnp.bfloat16)
        return MoEOutputs(jnp.zeros((0, k, h), jnp.bfloat16), topk_weights, topk_ids)
    e_loc = gemm1_weights.shape[0]
    if plan is None:
        plan = stages.plan(topk_ids, e_loc, expert_offset=local_expert_offset, num_experts=num_experts)
    # GEMM1's output is rounded to bf16 on every path (reference.G_DTYPE, SPEC 3 step 2).
    rows_per_group = expected_rows_per_expert(t, k, num_experts)  # sets the GEMM tile
    y = stages.expert_gemms(hidden_states, hidden_states_scale, plan, k, gemm1_weights,
                            gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, activation_type,
                            rows_per_group=rows_per_group)
    out = stages.finalize(y, plan, topk_weights, do_finalize)
    if do_finalize:
        return out
    return MoEOutputs(out, topk_weights, topk_ids)


def fp8_block_scale_moe(routing_logits, routing_bias, hidden_states, hidden_states_scale,
                        gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale,
                        *, top_k, num_experts=None, n_group=None, topk_group=None,
                        intermediate_size=None, local_expert_offset=0, local_num_experts=None,
                        routed_scaling_factor=None,
                        routing_method_type=RoutingMethodType.DeepSeekV3,
                        activation_type=ActivationType.Swiglu, do_finalize=True, backend="auto"):
    """DeepSeek-style FP8 block-scaled MoE layer (FlashInfer `trtllm_fp8_block_scale_moe`).

    Returns bf16 [T, H], or `MoEOutputs` with `do_finalize=False`. See SPEC section 1.
    Differentiable (SPEC section 5, `jax_moe.grad`) and vmappable over leading token batches."""
    return _moe(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, top_k=top_k,
                num_experts=num_experts, n_group=n_group, topk_group=topk_group,
                intermediate_size=intermediate_size, local_expert_offset=local_expert_offset,
                local_num_experts=local_num_experts, routed_scaling_factor=routed_scaling_factor,
                routing_method_type=routing_method_type, activation_type=activation_type,
                do_finalize=do_finalize, backend=backend, float_hidden=False)


def moe_bf16(routing_logits, routing_bias, hidden_states, gemm1_weights, gemm1_weights_scale,
             gemm2_weights, gemm2_weights_scale, *, top_k, num_experts=None, n_group=None,
             topk_group=None, intermediate_size=None, local_expert_offset=0,
             local_num_experts=None, routed_scaling_factor=None,
             routing_method_type=RoutingMethodType.DeepSeekV3,
             activation_type=ActivationType.Swiglu, do_finalize=True, backend="auto"):
    """`fp8_block_scale_moe` with float hidden states (bf16, f16 or f32 [T, H]), quantized
    inside with `quantize_activations`. The gradient reaches `hidden_states` straight through
    the quantization (d dequant(quant(x)) / dx taken as the identity), SPEC section 5."""
    return _moe(routing_logits, routing_bias, hidden_states, None, gemm1_weights,
                gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, top_k=top_k,
                num_experts=num_experts, n_group=n_group, topk_group=topk_group,
                intermediate_size=intermediate_size, local_expert_offset=local_expert_offset,
                local_num_experts=local_num_experts, routed_scaling_factor=routed_scaling_factor,
                routing_method_type=routing_method_type, activation_type=activation_type,
                do_finalize=do_finalize, backend=backend, float_hidden=True)


def _check_float_hidden(hidden_states, float_hidden):
    """For the float-input entries: checks the float hidden states and returns fp8 stand-ins
    (hidden, scale) with the shapes and dtypes the fp8 argument checks expect."""
    if not float_hidden:
        return None
    hidden_states = _checks.check_array(hidden_states, "hidden_states", 2, FLOAT_HIDDEN)
    t, h = hidden_states.shape
    if h % quant.BLOCK:
        raise ValueError(f"hidden_states: hidden size must be a multiple of {quant.BLOCK}, got {h}")
    return (jax.ShapeDtypeStruct((t, h), quant.FP8),
            jax.ShapeDtypeStruct((h // quant.BLOCK, t), jnp.float32))


def _stages(cfg, routing_a, routing_b, hidden_states, hidden_states_scale, gemm1_weights,
            gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, offset):
    """The stages of one call (forward only; `grad.moe` adds the VJP and the vmap rule)
    -> (result, topk_ids, topk_weights)."""
    if cfg.float_hidden:
        hidden_states, hidden_states_scale = quant.quantize_activations(hidden_states)
    plan = None
    if cfg.routed:
        ids, weights = routing_a, routing_b
    elif (cfg.use_cuda and routing_a.shape[0] == 1
          and _cuda_route_supported(cfg.num_experts, cfg.top_k, cfg.routing_method_type, cfg.n_group) is None
          and ops.route_plan_applies(cfg.num_experts, cfg.routing_method_type, cfg.n_group, offset)):
        ids, weights, plan = ops.route_plan(
            routing_a, routing_b, top_k=cfg.top_k, routing_method_type=cfg.routing_method_type,
            n_group=cfg.n_group, topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor, num_local_experts=gemm1_weights.shape[0],
            expert_offset=offset, num_experts=cfg.num_experts)
    else:
        ids, weights = _route(routing_a, routing_b, cfg.top_k, cfg.routing_method_type,
                              cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor,
                              cfg.use_cuda, cfg.strict)
    out = run_experts(ops if cfg.use_cuda else reference, ids, weights, hidden_states,
                      hidden_states_scale, gemm1_weights, gemm1_weights_scale, gemm2_weights,
                      gemm2_weights_scale, num_experts=cfg.num_experts,
                      local_expert_offset=offset, activation_type=cfg.activation_type,
                      do_finalize=cfg.do_finalize, plan=plan)
    return out, ids, weights


def _moe(routing_logits, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
         gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, top_k, num_experts,
         n_group, topk_group, intermediate_size, local_expert_offset, local_num_experts,
         routed_scaling_factor, routing_method_type, activation_type, do_finalize, backend,
         float_hidden):
    method = _checks.routing_method(routing_method_type)
    e = _checks.check_logits(routing_logits, routing_bias, num_experts)
    top_k, n_group, topk_group, rsf = _checks.check_routing(
        e, top_k, method, n_group, topk_group, routed_scaling_factor)
    stand_in = _check_float_hidden(hidden_states, float_hidden)
    _, _, _, offset = _checks.check_experts(
        *(stand_in or (hidden_states, hidden_states_scale)), gemm1_weights, gemm1_weights_scale,
        gemm2_weights, gemm2_weights_scale, num_tokens=routing_logits.shape[0], num_experts=e,
        intermediate_size=intermediate_size, local_expert_offset=local_expert_offset,
        local_num_experts=local_num_experts, activation_type=activation_type)
    use_cuda = _use_cuda(backend)
    cfg = grad.Config(routed=False, float_hidden=float_hidden, top_k=top_k,
                      routing_method_type=method, n_group=n_group, topk_group=topk_group,
                      routed_scaling_factor=rsf, num_experts=e,
                      activation_type=_checks.activation(activation_type),
                      do_finalize=bool(do_finalize), use_cuda=use_cuda, strict=backend == "cuda")
    return grad.moe(_stages, cfg, routing_logits, routing_bias, hidden_states, hidden_states_scale,
                    gemm1_weights, gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, offset)


def fp8_block_scale_routed_moe(topk_ids, routing_bias, hidden_states, hidden_states_scale,
                               gemm1_weights, gemm1_weights_scale, gemm2_weights,
                               gemm2_weights_scale, *, top_k, num_experts=None, n_group=None,
                               topk_group=None, intermediate_size=None, local_expert_offset=0,
                               local_num_experts=None, routed_scaling_factor=None,
                               routing_method_type=RoutingMethodType.DeepSeekV3,
                               activation_type=ActivationType.Swiglu, do_finalize=True,
                               backend="auto"):
    """Pre-routed MoE (FlashInfer `trtllm_fp8_block_scale_routed_moe`).

    `topk_ids` is packed int32 [T, k] ((id << 16) | bf16 bits of the weight) or a tuple
    (ids int32 [T, k], weights bf16/f32 [T, k]). The weights are used as given; the routing
    arguments (bias, groups, scaling factor, method) are accepted for signature compatibility and
    only validated. Ids outside [0, num_experts) are skipped. `num_experts` defaults to
    local_expert_offset + local_num_experts when not given. Differentiable: with the tuple form
    the float weights get a gradient too (packed ids carry none)."""
    return _routed_moe(topk_ids, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                       gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, top_k=top_k,
                       num_experts=num_experts, n_group=n_group, topk_group=topk_group,
                       intermediate_size=intermediate_size,
                       local_expert_offset=local_expert_offset,
                       local_num_experts=local_num_experts,
                       routed_scaling_factor=routed_scaling_factor,
                       routing_method_type=routing_method_type, activation_type=activation_type,
                       do_finalize=do_finalize, backend=backend, float_hidden=False)


def routed_moe_bf16(topk_ids, routing_bias, hidden_states, gemm1_weights, gemm1_weights_scale,
                    gemm2_weights, gemm2_weights_scale, *, top_k, num_experts=None, n_group=None,
                    topk_group=None, intermediate_size=None, local_expert_offset=0,
                    local_num_experts=None, routed_scaling_factor=None,
                    routing_method_type=RoutingMethodType.DeepSeekV3,
                    activation_type=ActivationType.Swiglu, do_finalize=True, backend="auto"):
    """`fp8_block_scale_routed_moe` with float hidden states [T, H] quantized inside (see
    `moe_bf16`); the gradient reaches them straight through the quantization."""
    return _routed_moe(topk_ids, routing_bias, hidden_states, None, gemm1_weights,
                       gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, top_k=top_k,
                       num_experts=num_experts, n_group=n_group, topk_group=topk_group,
                       intermediate_size=intermediate_size,
                       local_expert_offset=local_expert_offset,
                       local_num_experts=local_num_experts,
                       routed_scaling_factor=routed_scaling_factor,
                       routing_method_type=routing_method_type, activation_type=activation_type,
                       do_finalize=do_finalize, backend=backend, float_hidden=True)


def _routed_moe(topk_ids, routing_bias, hidden_states, hidden_states_scale, gemm1_weights,
                gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, *, top_k, num_experts,
                n_group, topk_group, intermediate_size, local_expert_offset, local_num_experts,
                routed_scaling_factor, routing_method_type, activation_type, do_finalize,
                backend, float_hidden):
    t, k = _checks.check_topk_ids(topk_ids)
    top_k = _checks._static_int(top_k, "top_k", minimum=1)
    if k != top_k:
        raise ValueError(f"topk_ids: expected shape [T, top_k={top_k}], got {(t, k)}")
    _checks.routing_method(routing_method_type)
    e_loc = gemm1_weights.shape[0] if hasattr(gemm1_weights, "shape") and len(gemm1_weights.shape) == 3 else None
    if num_experts is None:
        if routing_bias is not None and hasattr(routing_bias, "shape"):
            num_experts = routing_bias.shape[0]
        elif isinstance(local_expert_offset, int) and e_loc is not None:
            num_experts = local_expert_offset + e_loc
        else:
            raise ValueError("num_experts: required when local_expert_offset is traced")
    num_experts = _checks._static_int(num_experts, "num_experts", minimum=1)
    _checks.check_bias(routing_bias, num_experts)
    # The routing arguments select nothing here, but must still describe a valid routing.
    _checks.check_routing(num_experts, top_k, _checks.routing_method(routing_method_type),
                          n_group, topk_group, routed_scaling_factor)
    stand_in = _check_float_hidden(hidden_states, float_hidden)
    _, _, _, offset = _checks.check_experts(
        *(stand_in or (hidden_states, hidden_states_scale)), gemm1_weights, gemm1_weights_scale,
        gemm2_weights, gemm2_weights_scale, num_tokens=t, num_experts=num_experts,
        intermediate_size=intermediate_size, local_expert_offset=local_expert_offset,
        local_num_experts=local_num_experts, activation_type=activation_type)
    if isinstance(topk_ids, (tuple, list)):
        ids, weights = topk_ids
    else:
        ids, weights = unpack_topk(topk_ids)
    use_cuda = _use_cuda(backend)
    cfg = grad.Config(routed=True, float_hidden=float_hidden, top_k=top_k,
                      routing_method_type=_checks.routing_method(routing_method_type), n_group=None,
                      topk_group=None, routed_scaling_factor=None, num_experts=num_experts,
                      activation_type=_checks.activation(activation_type),
                      do_finalize=bool(do_finalize), use_cuda=use_cuda, strict=backend == "cuda")
    return grad.moe(_stages, cfg, ids, weights, hidden_states, hidden_states_scale, gemm1_weights,
                    gemm1_weights_scale, gemm2_weights, gemm2_weights_scale, offset)
