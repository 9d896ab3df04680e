"""A float64 NumPy oracle for jax_moe, written from SPEC sections 2-3 alone.

It deliberately imports nothing from jax_moe: routing is a per-token loop over the SPEC table,
quantization uses ml_dtypes directly, and the MoE is a loop over (token, slot) pairs with
dequantized float64 matrices.
"""
import math

import ml_dtypes
import numpy as np

BLOCK = 128
FP8 = ml_dtypes.float8_e4m3fn
BF16 = ml_dtypes.bfloat16
FP8_MAX = 448.0
FLT_MIN = float(np.finfo(np.float32).tiny)

# RoutingMethodType / ActivationType integer codes (SPEC section 1).
DEFAULT, RENORMALIZE, DEEPSEEK_V3, LLAMA4, RENORMALIZE_NAIVE = 0, 1, 2, 3, 4
TOPK, SIGMOID_RENORM, MINIMAX2, SIGMOID, TOPK_SIGMOID = 5, 6, 7, 8, 9
SWIGLU, GEGLU, RELU2, IDENTITY = 3, 4, 6, 9


# ----------------------------------------------------------------------------- rounding helpers
def to_bf16(x):
    """Rounds float values to bfloat16 (nearest even) and returns them as float64."""
    return np.asarray(x, np.float64).astype(np.float32).astype(BF16).astype(np.float64)


def bf16_ulp(x):
    """Distance from |x| (rounded to bf16) to the next larger bf16 value, as float64."""
    a = np.abs(np.asarray(x, np.float64)).astype(np.float32).astype(BF16)
    nxt = (a.view(np.uint16) + np.uint16(1)).view(BF16)
    return nxt.astype(np.float64) - a.astype(np.float64)


def to_fp8(x):
    """float -> fp8 e4m3fn, round to nearest even, saturating at +-448."""
    return np.clip(np.asarray(x, np.float64), -FP8_MAX, FP8_MAX).astype(FP8)


def quantize_rows(a):
    """float [M, N] -> (fp8 [M, N], scales [M, N/128] as float64): s = max(amax/448, FLT_MIN)
    and q = fp8(a / s), both in float32 as SPEC 3 steps 3-4 compute them (the scales are float32
    arrays; a / s rounds to float32 before fp8, which decides the exact fp8 ties that
    bf16-valued activations such as Relu2's and Identity's hit)."""
    a = np.asarray(a, np.float64)
    m, n = a.shape
    blocks = a.reshape(m, n // BLOCK, BLOCK)
    s = np.maximum(np.abs(blocks).max(axis=-1) / FP8_MAX, FLT_MIN).astype(np.float32).astype(np.float64)
    q = to_fp8((blocks / s[..., None]).astype(np.float32))
    return q.reshape(m, n), s


def dequant(q, scale):
    """fp8 [..., N, K] with scales [..., N/bn, K/128] -> float64 [..., N, K].

    The scale's row-block size bn is inferred: N/scale.shape[-2] (1 for per-row activation
    scales [M, K/128], 128 for weight scales [.., N/128, K/128])."""
    q = np.asarray(q).astype(np.float64)
    scale = np.asarray(scale, np.float64)
    bn = q.shape[-2] // scale.shape[-2]
    bk = q.shape[-1] // scale.shape[-1]
    return q * np.repeat(np.repeat(scale, bn, axis=-2), bk, axis=-1)


# ----------------------------------------------------------------------------- routing (SPEC 2)
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def topk(v, k, allowed=None):
    """Indices of the k largest entries of v, descending; on a tie the smaller index wins."""
    cand = [i for i in range(len(v)) if allowed is None or allowed[i]]
    cand.sort(key=lambda i: (-v[i], i))
    return cand[:k]


def route(logits, bias, top_k, method, n_group=None, topk_group=None, rsf=None):
    """logits [T, E] (values taken as float32), bias [E] or None -> (ids int64 [T, k],
    weights float64 [T, k]) before the final bf16 rounding (see `route_bf16`)."""
    lg = np.asarray(np.asarray(logits).astype(np.float32), np.float64)
    t, e = lg.shape
    b_vec = np.zeros(e) if bias is None else np.asarray(np.asarray(bias).astype(np.float32), np.float64)
    rsf = 1.0 if rsf is None else float(rsf)
    k = top_k
    ids = np.zeros((t, k), np.int64)
    ws = np.zeros((t, k), np.float64)
    for r in range(t):
        l = lg[r]
        if method == DEFAULT:
            p = _softmax(l)
            sel = topk(p, k)
            w = p[sel]
        elif method == RENORMALIZE:
            sel = topk(l, k)
            w = _softmax(l[sel])
        elif method in (DEEPSEEK_V3, MINIMAX2):
            s = _sigmoid(l)
            b = s + b_vec
            allowed = None
            if method == DEEPSEEK_V3 and n_group is not None and n_group > 1:
                per = e // n_group
                gscore = [sum(sorted(b[g * per:(g + 1) * per], reverse=True)[:2])
                          for g in range(n_group)]
                kept = topk(gscore, topk_group)
                allowed = [i // per in kept for i in range(e)]
            sel = topk(b, k, allowed)
            w = s[sel] / (s[sel].sum() + 1e-20) * rsf
        elif method == LLAMA4:
            assert k == 1
            sel = topk(l, 1)
            w = _sigmoid(l[sel])
        elif method == RENORMALIZE_NAIVE:
            p = _softmax(l)
            sel = topk(p, k)
            w = p[sel] / p[sel].sum()
        elif method == TOPK:
            sel = topk(l, k)
            w = l[sel]
        elif method == SIGMOID_RENORM:
            s = _sigmoid(l)
            sel = topk(s, k)
            w = s[sel] / max(s[sel].sum(), 1e-20)
        elif method == SIGMOID:
            s = _sigmoid(l)
            sel = topk(s, k)
            w = s[sel]
        elif method == TOPK_SIGMOID:
            sel = topk(l, k)
            w = _sigmoid(l[sel])
        else:
            raise ValueError(f"unknown routing method {method}")
        ids[r] = sel
        ws[r] = w
    return ids, ws


def route_bf16(*args, **kwargs):
    """`route` with the weights rounded to bfloat16 (SPEC 2), returned as float64."""
    ids, w = route(*args, **kwargs)
    return ids, to_bf16(w)


# ----------------------------------------------------------------------------- MoE (SPEC 3)
def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _activation(g, activation):
    if activation in (SWIGLU, GEGLU):
        i = g.shape[-1] // 2
        up, gate = g[:i], g[i:]
        if activation == SWIGLU:
            return gate / (1.0 + np.exp(-gate)) * up
        return _gelu_tanh(gate) * up
    if activation == RELU2:
        return np.maximum(g, 0.0) ** 2
    if activation == IDENTITY:
        return g
    raise ValueError(f"unsupported activation {activation}")


def moe(ids, weights, hidden_fp8, hidden_scale, w1, w1s, w2, w2s, activation,
        local_expert_offset=0, do_finalize=True, rounding=True):
    """SPEC section 3 in float64.

    ids [T, k] (any ints), weights [T, k] (used as given), hidden fp8 [T, H], hidden_scale
    [H/128, T], w1 fp8 [E_loc, 2I or I, H], w1s, w2 fp8 [E_loc, H, I], w2s.
    rounding=True: GEMM1 out -> bf16 (SPEC 3 step 2 allows it; the library rounds there on
    every path), fp8 re-quantization of the activation, GEMM2 out -> bf16, final output -> bf16.
    rounding=False: exact float64 after dequantizing the inputs.
    Returns out [T, H] (do_finalize) or the unweighted expert outputs [T, k, H].
    """
    ids = np.asarray(ids).astype(np.int64)
    weights = np.asarray(np.asarray(weights).astype(np.float32), np.float64)
    x = dequant(hidden_fp8, np.asarray(hidden_scale, np.float64).T)  # [T, H]
    W1 = dequant(w1, w1s)
    W2 = dequant(w2, w2s)
    e_loc = W1.shape[0]
    t, k = ids.shape
    h = x.shape[1]
    y = np.zeros((t, k, h))
    for r in range(t):
        for j in range(k):
            le = ids[r, j] - local_expert_offset
            if not 0 <= le < e_loc:
                continue
            g = W1[le] @ x[r]
            if rounding:
                g = to_bf16(g)
            a = _activation(g, activation)
            if rounding:
                q, s = quantize_rows(a[None, :])
                a = dequant(q, s)[0]
            yj = W2[le] @ a
            y[r, j] = to_bf16(yj) if rounding else yj
    if not do_finalize:
        return y
    out = np.einsum("tk,tkh->th", weights, y)
    return to_bf16(out) if rounding else out


def rel(a, b):
    """SPEC's error measure: ||a - b||_F / ||b||_F over float64 copies."""
    a = np.asarray(np.asarray(a).astype(np.float32), np.float64)
    b = np.asarray(np.asarray(b).astype(np.float32), np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / nb) if nb else float(np.linalg.norm(a - b))
