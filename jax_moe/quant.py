"""FP8 (e4m3fn) block quantization helpers, 128-wide blocks, float32 scales."""
import jax.numpy as jnp
import numpy as np

BLOCK = 128
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0
FLT_MIN = float(np.finfo(np.float32).tiny)


def _to_fp8(x):
    """Round-to-nearest-even, saturating at +-448 (a plain cast would turn overflow into NaN)."""
    return jnp.clip(x, -FP8_MAX, FP8_MAX).astype(FP8)


def _check_blocks(name, size, axis):
    if size % BLOCK:
        raise ValueError(f"{name}: dimension {axis} must be a multiple of {BLOCK}, got {size}")


def quantize_rows(a):
    """float [M, N] -> (fp8 [M, N], float32 scales [M, N/128]); 1x128 blocks along the last axis.

    s = max(amax / 448, FLT_MIN), q = fp8(a / s): the re-quantization rule of SPEC section 3 step 4.
    """
    a = jnp.asarray(a, jnp.float32)
    m, n = a.shape
    blocks = a.reshape(m, n // BLOCK, BLOCK)
    scale = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1) / FP8_MAX, FLT_MIN)
    q = _to_fp8(blocks / scale[..., None])
    return q.reshape(m, n), scale


def quantize_activations(x):
    """Activations [T, H] (any float dtype) -> (fp8 [T, H], float32 scale [H/128, T]).

    Scales are per token per 128-wide block of H, stored with the token axis contiguous
    (FlashInfer's `hidden_states_scale` layout).
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"quantize_activations: x must be [T, H], got shape {x.shape}")
    _check_blocks("quantize_activations: x", x.shape[1], 1)
    q, scale = quantize_rows(x)
    return q, scale.T


def dequantize_activations(x_fp8, scale):
    """(fp8 [T, H], float32 [H/128, T]) -> float32 [T, H]."""
    t, h = x_fp8.shape
    blocks = x_fp8.astype(jnp.float32).reshape(t, h // BLOCK, BLOCK)
    return (blocks * scale.T[..., None]).reshape(t, h)


def quantize_weights(w):
    """Weights [..., N, K] -> (fp8 [..., N, K], float32 scale [..., N/128, K/128]), 128x128 blocks."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize_weights: w must be [..., N, K], got shape {w.shape}")
    *lead, n, k = w.shape
    _check_blocks("quantize_weights: w", n, w.ndim - 2)
    _check_blocks("quantize_weights: w", k, w.ndim - 1)
    blocks = w.reshape(*lead, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
    scale = jnp.maximum(amax / FP8_MAX, FLT_MIN)
    q = _to_fp8(blocks / scale[..., :, None, :, None])
    return q.reshape(w.shape), scale


def dequantize_weights(w_fp8, scale):
    """(fp8 [..., N, K], float32 [..., N/128, K/128]) -> float32 [..., N, K]."""
    *lead, n, k = w_fp8.shape
    blocks = w_fp8.astype(jnp.float32).reshape(*lead, n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    return (blocks * scale[..., :, None, :, None]).reshape(w_fp8.shape)


def dequantize_rows(q, scale):
    """(fp8 [M, N], float32 [M, N/128]) -> float32 [M, N]."""
    m, n = q.shape
    return (q.astype(jnp.float32).reshape(m, n // BLOCK, BLOCK) * scale[..., None]).reshape(m, n)
