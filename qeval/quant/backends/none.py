"""The full-precision baseline as a backend: no schemes to parse, nothing to account, dequantize or
merge; it has a label and a colour like every other backend, and the `none` preset."""
from __future__ import annotations

from qeval.quant.backend import BACKENDS, Backend
from qeval.quant.formats import quant_format

BACKENDS.add("none", Backend("none", "the full-precision baseline (no quantization)", colour="black"))


@quant_format("none", "the full-precision baseline (float32 on CPU, bfloat16 on CUDA)")
def _none(compute_dtype) -> None:
    return None
