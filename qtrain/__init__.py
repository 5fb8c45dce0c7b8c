"""qtrain: pretrain LLaMA models on one GPU with int8 weights, stochastic rounding and APOLLO."""

__version__ = "0.1.0"
