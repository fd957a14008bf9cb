"""Quantization formats: one registry of names a user types, one verb to measure what a format costs.

A format is a frozen value (`QuantFormat`): its name, a description, the theoretical bits each
quantized linear weight costs, and either a builder that returns the exact `quantization_config`
transformers applies at load time (bitsandbytes) or an `after_load` step that quantizes the loaded
float model in place (torchao, quanto, GGUF). `none` is an ordinary entry.

Names. A format is `backend:scheme[:options]` (`torchao:int8-wo`, `quanto:int4:g64`, `gguf:q4_0`),
parsed by the backend's `Backend.parse`; a few fixed names are presets (`bnb-nf4`, ...; their record
keys are unchanged from before backends existed). Each backend declares what it needs (Python
packages with the pip extra that installs them, CUDA, calibration data) and each format what it is:
theoretical bits per weight, whether compute uses the format's real low-bit storage or simulates its
numerics in float ("simulated"), whether it can be saved and reloaded, whether LoRA can train on it.
`QuantFormat.require(device)` turns a missing package into one line (`pip install 'qeval[torchao]'`)
before anything is computed."""
from qeval.quant.formats import (QuantFormat, Backend, BACKENDS, bad_option, group_option, FormatRegistry, FORMATS, DEFAULT_FORMATS, format_order, quant_format, quantizable_linears, Footprint, is_quantized_param, flatten_tensor, measure_footprint)  # noqa: F401
from qeval.quant import backends  # noqa: E402,F401  (registers every backend's formats)
