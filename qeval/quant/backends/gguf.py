"""GGUF (llama.cpp) types, simulated with exact GGUF numerics: `gguf:q4_0`, `gguf:q8_0`, ...

Each quantized linear weight goes through `gguf.quants.quantize` (the gguf package's pure-numpy port
of llama.cpp's reference quantizers) and straight back through `gguf.quants.dequantize`; the model then
computes in float with weights that hold exactly the values a llama.cpp file of that type would hold.
So the numbers (KL, accuracy) are GGUF's, while the memory is float's: the format is marked
"simulated", and the footprint records the packed bytes the quantizer produced (`packed_bytes`: the
bytes those tensors take in a .gguf file), next to the float bytes the model really holds.

The K-quants and llama.cpp's mixes (`gguf:q4_k_m`, `gguf:q6_k`, ...) are in qeval.quant.backends.gguf_k: gguf's
Python classes only dequantize them, so they are packed by llama.cpp's own ggml library (built once
with `qeval setup --backend gguf-k`). The IQ1/IQ2/IQ3 types are left out (importance matrix). `gguf:mxfp4` is OCP MXFP4 through gguf-py's own
quantizer (gguf >= 0.18 has it); NVFP4 is left out (gguf-py only dequantizes it).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from qeval.quant.backend import mark, marked_account
from qeval.quant.formats import BACKENDS, Backend, QuantFormat, bad_option, quantizable_linears
from qeval.quant.backends import gguf_k

if TYPE_CHECKING:
    import torch

BLOCK = 32  # every legacy GGUF type quantizes blocks of 32 consecutive weights along a row
# type -> (bits per weight: 32 codes + per-block fp16 scale [+ fp16 min] [+ 32 high bits]) / 32, words)
TYPES = {
    "q8_0": (8 + 16 / BLOCK, "8-bit codes, fp16 scale per block of 32 (symmetric)"),
    "q5_1": (5 + 32 / BLOCK, "5-bit codes, fp16 scale + fp16 min per block of 32 (asymmetric)"),
    "q5_0": (5 + 16 / BLOCK, "5-bit codes, fp16 scale per block of 32 (symmetric)"),
    "q4_1": (4 + 32 / BLOCK, "4-bit codes, fp16 scale + fp16 min per block of 32 (asymmetric)"),
    "q4_0": (4 + 16 / BLOCK, "4-bit codes, fp16 scale per block of 32 (symmetric)"),
    # OCP MXFP4 as llama.cpp stores it (gpt-oss): e2m1 codes, one e8m0 (power-of-two) scale per 32
    "mxfp4": (4 + 8 / BLOCK, "e2m1 (fp4) codes, e8m0 power-of-two scale per block of 32 (MXFP4)"),
}


def roundtrip(weight: torch.Tensor, qtype: str) -> tuple[torch.Tensor, int]:
    """(the weight after GGUF quantize -> dequantize, in its own dtype; the packed bytes)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype.upper()]
    w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    packed = quantize(np.ascontiguousarray(w), t)
    back = dequantize(packed, t).reshape(w.shape)
    return torch.from_numpy(back).to(device=weight.device, dtype=weight.dtype), int(packed.nbytes)


def _apply(qtype: str):
    def after_load(model, device: str, compute_dtype: torch.dtype) -> None:
        import torch

        with torch.no_grad():
            for _, m in quantizable_linears(model):
                new, nbytes = roundtrip(m.weight, qtype)
                m.weight.copy_(new)
                mark(m, packed_bytes=nbytes)  # the footprint: quantized, simulated, its packed size
    return after_load


def _parse(scheme: str, options: tuple[str, ...]) -> QuantFormat:
    if scheme in gguf_k.SCHEMES:
        return gguf_k.parse(scheme, options, _K_BACKEND)
    name = f"gguf:{scheme}"
    if options:
        raise bad_option(name, options[0], "no options (GGUF types have a fixed block of 32)")
    bits, words = TYPES[scheme]
    return QuantFormat(
        name, f"GGUF {scheme.upper()}: {words}; simulated (quantize -> dequantize with gguf.quants)",
        lambda in_features, b=bits: b, lambda compute_dtype: None, backend="gguf", after_load=_apply(scheme),
        kernel="simulated", storage="float weights holding the dequantized GGUF values",
        can_save=False, lora_trainable=True, options=(("type", scheme.upper()), ("block", BLOCK)),
        packages=("gguf",), requires=BACKENDS.get("gguf"), divides=BLOCK,
        held_bits=lambda in_features, float_bits: float_bits)  # float weights holding GGUF's values


def _needs_ggml(fmt_name: str):
    """The K-quant formats need llama.cpp's ggml library too (one line naming the command that builds it)."""
    from qeval.quant.backends import ggml_lib

    return None if ggml_lib.available() else ggml_lib.missing_error(fmt_name)


def _keep(model, dtype):
    return model  # simulated: the weights already are float (holding GGUF's values); nothing to dequantize


BACKENDS.add("gguf", Backend(
    "gguf", "llama.cpp GGUF types, simulated with exact numerics (K-quants through llama.cpp's ggml)",
    _parse, tuple(TYPES) + gguf_k.SCHEMES, modules=("gguf.quants",), extra="gguf",
    option_help="GGUF types: " + ", ".join(tuple(TYPES) + gguf_k.SCHEMES), colour="tab:red",
    account=marked_account, dequantize=_keep))
_K_BACKEND = dataclasses.replace(BACKENDS.get("gguf"), check=_needs_ggml)
