"""Quantization backends, one file each; importing this package registers them all (none imports torch)."""
# `none` first: the baseline is the first format every listing shows
from qeval.quant.backends import none  # noqa: F401,I001
from qeval.quant.backends import awq, bnb, gguf, gptq, hqq, quanto, torchao  # noqa: F401  (each registers its formats)
