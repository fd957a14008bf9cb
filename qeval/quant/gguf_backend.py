"""GGUF (llama.cpp) types, simulated with exact GGUF numerics: `gguf:q4_0`, `gguf:q8_0`, ...

Each quantized linear weight goes through `gguf.quants.quantize` (the gguf package's pure-numpy port
of llama.cpp's reference quantizers) and straight back through `gguf.quants.dequantize`; the model then
computes in float with weights that hold exactly the values a llama.cpp file of that type would hold.
So the numbers (KL, accuracy) are GGUF's, while the memory is float's: the format is marked
"simulated", and the footprint records the packed bytes the quantizer produced (`packed_bytes`: the
bytes those tensors take in a .gguf file), next to the float bytes the model really holds.

Left out: the K-quants (Q2_K..Q6_K) and IQ types. Their Python classes only dequantize (llama.cpp's
`llama-quantize` binary is needed to make them), and their 256-weight super-blocks do not divide
SmolLM2-135M's hidden size 576 anyway.
"""
from __future__ import annotations

import numpy as np
import torch

from qeval.quant import BACKENDS, Backend, QuantFormat, bad_option, quantizable_linears

BLOCK = 32  # every legacy GGUF type quantizes blocks of 32 consecutive weights along a row
# type -> (bits per weight: 32 codes + per-block fp16 scale [+ fp16 min] [+ 32 high bits]) / 32, words)
TYPES = {
    "q8_0": (8 + 16 / BLOCK, "8-bit codes, fp16 scale per block of 32 (symmetric)"),
    "q5_1": (5 + 32 / BLOCK, "5-bit codes, fp16 scale + fp16 min per block of 32 (asymmetric)"),
    "q5_0": (5 + 16 / BLOCK, "5-bit codes, fp16 scale per block of 32 (symmetric)"),
    "q4_1": (4 + 32 / BLOCK, "4-bit codes, fp16 scale + fp16 min per block of 32 (asymmetric)"),
    "q4_0": (4 + 16 / BLOCK, "4-bit codes, fp16 scale per block of 32 (symmetric)"),
}


def roundtrip(weight: torch.Tensor, qtype: str) -> tuple[torch.Tensor, int]:
    """(the weight after GGUF quantize -> dequantize, in its own dtype; the packed bytes)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype.upper()]
    w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    packed = quantize(np.ascontiguousarray(w), t)
    back = dequantize(packed, t).reshape(w.shape)
    return torch.from_numpy(back).to(device=weight.device, dtype=weight.dtype), int(packed.nbytes)


def _apply(qtype: str):
    def after_load(model, device: str, compute_dtype: torch.dtype) -> None:
        with torch.no_grad():
            for _, m in quantizable_linears(model):
                new, nbytes = roundtrip(m.weight, qtype)
                m.weight.copy_(new)
                m._qeval_packed_bytes = nbytes  # measure_footprint: quantized, simulated, packed size
    return after_load


def _parse(scheme: str, options: tuple[str, ...]) -> QuantFormat:
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


BACKENDS.add("gguf", Backend(
    "gguf", "llama.cpp GGUF types (legacy 32-weight blocks), simulated with exact numerics",
    _parse, tuple(TYPES), modules=("gguf.quants",), extra="gguf",
    option_help="GGUF types: " + ", ".join(TYPES)))
