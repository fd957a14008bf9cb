"""Quantization backends, one file each; importing this package registers them all."""
from qeval.quant.backends import bnb, gguf, gptq, hqq, quanto, torchao  # noqa: F401  (each registers its formats)
