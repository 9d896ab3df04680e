"""Random MoE layer inputs for the CPU tests, drawn like real ones: N(0,1) hidden states and
logits, weights N(0,1)/sqrt(fan_in), quantized with the library's quantize_activations /
quantize_weights; selection bias 0.2 * N(0,1)."""
import types

import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import ActivationType as A

GATED = (A.Swiglu, A.Geglu)


def quantized_layer(rng, *, t, h, i, e, e_loc=None, act=A.Swiglu):
    """Draws from `rng` (in this order: hidden, W1, W2, logits, bias). Returns a namespace with
    x (float32 hidden), hq, hs, w1, w1s, w2, w2s, logits (float32 numpy), bias."""
    e_loc = e if e_loc is None else e_loc
    n1 = 2 * i if act in GATED else i
    x = rng.standard_normal((t, h)).astype(np.float32)
    w1 = (rng.standard_normal((e_loc, n1, h)) / np.sqrt(h)).astype(np.float32)
    w2 = (rng.standard_normal((e_loc, h, i)) / np.sqrt(i)).astype(np.float32)
    hq, hs = jax_moe.quantize_activations(jnp.asarray(x))
    w1q, w1s = jax_moe.quantize_weights(jnp.asarray(w1))
    w2q, w2s = jax_moe.quantize_weights(jnp.asarray(w2))
    logits = rng.standard_normal((t, e)).astype(np.float32)
    bias = jnp.asarray(0.2 * rng.standard_normal(e), jnp.float32)
    return types.SimpleNamespace(x=jnp.asarray(x), hq=hq, hs=hs, w1=w1q, w1s=w1s, w2=w2q,
                                 w2s=w2s, logits=logits, bias=bias)
