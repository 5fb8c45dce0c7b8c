"""Group-wise int8 weight storage and stochastic rounding."""

from qtrain.quant.groupwise import dequantize_groupwise, quantize_groupwise
from qtrain.quant.stochastic_round import quantize_groupwise_sr, requantize_sr_, stochastic_round

__all__ = [
    "dequantize_groupwise",
    "quantize_groupwise",
    "quantize_groupwise_sr",
    "requantize_sr_",
    "stochastic_round",
]
