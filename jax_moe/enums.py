"""Routing-method and activation enums. Integer values are FlashInfer's, so codes port unchanged."""
import enum


class RoutingMethodType(enum.IntEnum):
    Default = 0  # softmax -> top-k
    Renormalize = 1  # top-k -> softmax over the selected logits
    DeepSeekV3 = 2  # sigmoid + bias, grouped top-k, renormalize, scale
    Llama4 = 3  # top-1 -> sigmoid
    RenormalizeNaive = 4  # softmax -> top-k -> renormalize
    TopK = 5  # top-k of the raw logits
    SigmoidRenorm = 6  # sigmoid -> top-k -> renormalize
    MiniMax2 = 7  # sigmoid + bias -> top-k -> renormalize, scale
    Sigmoid = 8  # sigmoid -> top-k
    TopKSigmoid = 9  # top-k of the logits -> sigmoid


class ActivationType(enum.IntEnum):
    Gelu = 0
    Relu = 1
    Silu = 2
    Swiglu = 3
    Geglu = 4
    SwigluBias = 5
    Relu2 = 6
    Identity = 9


SUPPORTED_ACTIVATIONS = (ActivationType.Swiglu, ActivationType.Geglu, ActivationType.Relu2,
                         ActivationType.Identity)
GATED_ACTIVATIONS = (ActivationType.Swiglu, ActivationType.Geglu)
# Methods whose selection adds routing_bias (elsewhere the bias is ignored).
BIASED_METHODS = (RoutingMethodType.DeepSeekV3, RoutingMethodType.MiniMax2)
# Methods whose weights are multiplied by routed_scaling_factor.
SCALED_METHODS = (RoutingMethodType.DeepSeekV3, RoutingMethodType.MiniMax2)


def is_gated(activation) -> bool:
    return ActivationType(activation) in GATED_ACTIVATIONS
