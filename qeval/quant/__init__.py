"""Quantization formats: one registry of names a user types, one verb to measure what a format costs.

A format is a frozen value (`QuantFormat`, qeval.quant.formats) built by its backend; a backend is a
frozen value (`Backend`, qeval.quant.backend: the contract) declaring its formats, byte accounting,
dequantize, LoRA targets, capabilities, label and colour, one file each under qeval.quant.backends.
`measure_footprint` (qeval.quant.footprint) asks the backends what a loaded model holds.

Importing this package registers every backend and imports no torch: listings, labels, colours and
capability flags are cheap; torch loads in the functions that quantize, load and measure.
"""
from qeval.quant.backend import (BACKENDS, Backend, Held, Mark, backend_colour, backend_colours,  # noqa: F401
                                 backend_of, mark, marked)
from qeval.quant.formats import (QuantFormat, bad_option, group_option, FormatRegistry, FORMATS,  # noqa: F401
                                 DEFAULT_FORMATS, format_order, quant_format)
from qeval.quant.footprint import (quantizable_linears, Footprint, is_quantized_param, flatten_tensor,  # noqa: F401
                                   measure_footprint)
from qeval.quant import backends  # noqa: E402,F401  (registers every backend's formats)
