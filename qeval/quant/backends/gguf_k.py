"""GGUF K-quants and llama.cpp's quantization mixes (`gguf:q4_k_m`, `gguf:q6_k`, `gguf:q4_k:pure`, ...).

A scheme is a `llama-quantize` file type (ftype): `q2_k`, `q3_k_s`, `q3_k_m`, `q3_k_l`, `q4_k_s`,
`q4_k_m`, `q5_k_s`, `q5_k_m`, `q6_k`, `iq4_nl`, `iq4_xs`, with llama-quantize's aliases `q3_k` ->
`q3_k_m`, `q4_k` -> `q4_k_m`, `q5_k` -> `q5_k_m`. Each linear weight gets the ggml type llama.cpp
would give it:

1. the ftype's default type (Q4_K for Q4_K_M), changed per tensor by `llama_tensor_get_type_impl`'s
   rules (ported below for llama-architecture models: e.g. Q4_K_M gives attn_v and ffn_down Q6_K in
   the layers `use_more_bits` picks); the option `:pure` skips these rules (`llama-quantize --pure`);
2. then `tensor_type_fallback`: a 256-weight super-block type on a row whose length is not a multiple
   of 256 falls back (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL),
   and to F16 when even 32 does not divide it.

SmolLM2-135M's rows are 576 long except down_proj's 1536, so only down_proj can hold a K-quant there:
`gguf:q4_k_m` on it is mostly Q5_0. Every record says so: the footprint's `packed_types` (ggml type ->
quantized weights), and its theory bytes are computed tensor by tensor from the types' block layouts.

The values are llama.cpp's: each tensor is packed by ggml's own `ggml_quantize_chunk` (no importance
matrix; see qeval.quant.backends.ggml_lib) and dequantized by `gguf.quants`. Compute is simulated in float, as
for the legacy GGUF types.

Ported from llama.cpp's src/llama-quant.cpp (vendored in llama-cpp-python 0.3.36): the rules for the
K and IQ4 ftypes on non-MoE, non-Falcon models. Left out: the output / token-embedding tensor (qeval
keeps embeddings and the head in float for every format; llama.cpp would make SmolLM2's tied embedding
Q8_0, or Q6_K when the width is a multiple of 256), the 70B attn_v bump, the 8-expert rules, fused QKV
tensors, importance matrices, and the IQ1/IQ2/IQ3 ftypes (they need an importance matrix or fall back).
"""
from __future__ import annotations

import logging
import re
from collections import Counter

from typing import TYPE_CHECKING

from qeval.quant.backend import mark
from qeval.quant.formats import QuantFormat, bad_option, quantizable_linears

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# ggml type -> (weights per block, bytes per block), from ggml-common.h's block structs
TYPE_LAYOUT = {
    "F16": (1, 2),
    "Q8_0": (32, 2 + 32),  # d + 32 int8
    "Q5_1": (32, 2 + 2 + 4 + 16),  # d, m, 32 high bits, 32 nibbles
    "Q5_0": (32, 2 + 4 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q4_0": (32, 2 + 16),
    "IQ4_NL": (32, 2 + 16),  # d + 32 nibbles indexing a fixed non-linear grid
    "Q2_K": (256, 16 + 64 + 2 + 2),  # 4-bit scales+mins per 16, 2-bit codes, d, dmin
    "Q3_K": (256, 32 + 64 + 12 + 2),  # high-bit mask, 2-bit low codes, 6-bit scales per 16, d
    "Q4_K": (256, 2 + 2 + 12 + 128),  # d, dmin, 6-bit scales+mins per 32, nibbles
    "Q5_K": (256, 2 + 2 + 12 + 32 + 128),  # + high bits
    "Q6_K": (256, 128 + 64 + 16 + 2),  # low 4 bits, high 2 bits, int8 scales per 16, d
    "IQ4_XS": (256, 2 + 2 + 4 + 128),  # d, high + low scale bits per 32, nibbles
}


def bits(type_name: str) -> float:
    block, nbytes = TYPE_LAYOUT[type_name]
    return nbytes * 8 / block


# ftype -> its default type (llama_ftype_get_default_type)
FTYPES = {
    "q2_k": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K",
    "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS",
}
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}  # as llama-quantize reads them
SCHEMES = tuple(FTYPES) + tuple(ALIASES)

# Hugging Face llama module name -> llama.cpp tensor category
CATEGORY = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
RULES_VERSION = 1  # bump when the port below changes what a tensor gets (it is in every key)


def fallback(type_name: str, ncols: int) -> str:
    """tensor_type_fallback: the type a row of `ncols` weights can actually hold."""
    if ncols % TYPE_LAYOUT[type_name][0] == 0:
        return type_name
    new = _FALLBACK.get(type_name, type_name)  # a 32-block type has no smaller block to demote to
    return new if ncols % TYPE_LAYOUT[new][0] == 0 else "F16"


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    # C integer division; i - n/8 is never negative where it is reached
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def mix_type(ftype: str, category: str, i_layer: int, n_layer: int, n_gqa: int) -> str:
    """llama_tensor_get_type_impl for a llama-architecture model (no experts, not Falcon, not 70B, no
    importance matrix, embeddings not quantized): the type before the shape fallback."""
    t = FTYPES[ftype]
    # i_attention_wv / i_ffn_down count tensors in llama-quantize's order, weights_map's: by layer number
    # (llama-model-loader.h, weight_name_comparer), one of each per layer -- so the layer index
    if category == "attn_v":
        if ftype == "q2_k":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ftype == "q3_k_m":
            t = "Q5_K" if i_layer < 2 else "Q4_K"
        elif ftype == "q3_k_l":
            t = "Q5_K"
        elif ftype in ("iq4_nl", "iq4_xs") and n_gqa >= 4:
            t = "Q5_K"
        elif ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layer):
            t = "Q6_K"
        elif ftype == "q4_k_s" and i_layer < 4:
            t = "Q5_K"
    elif category == "ffn_down":
        if ftype == "q2_k":
            t = "Q3_K"
        elif ftype == "q3_k_m":
            t = "Q5_K" if i_layer < n_layer // 16 else "Q4_K"
        elif ftype == "q3_k_l":
            t = "Q5_K"
        elif ftype == "q4_k_m":
            if use_more_bits(i_layer, n_layer):
                t = "Q6_K"
        elif i_layer < n_layer // 8 and ftype in ("iq4_nl", "iq4_xs"):
            t = "Q5_K"
        elif ftype == "q5_k_m" and use_more_bits(i_layer, n_layer):
            t = "Q6_K"
        elif ftype == "q4_k_s" and i_layer < n_layer // 8:
            t = "Q5_K"
    elif category == "attn_output":
        t = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(ftype, t)
    return t


def tensor_types(model: torch.nn.Module, ftype: str, pure: bool) -> dict[str, tuple[str, str]]:
    """Module name -> (the type the ftype's rules want, the type after the shape fallback) for every
    quantized linear of `model` under `ftype`."""
    cfg = model.config
    n_layer = int(cfg.num_hidden_layers)
    n_gqa = int(cfg.num_attention_heads) // int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    out = {}
    for name, m in quantizable_linears(model):
        t = FTYPES[ftype]
        if not pure:
            layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            category = CATEGORY.get(name.split(".")[-1], "other")
            t = mix_type(ftype, category, int(layer.group(1)) if layer else 0, n_layer, n_gqa)
        out[name] = (t, fallback(t, m.in_features))
    return out


def roundtrip(weight: torch.Tensor, type_name: str) -> tuple[torch.Tensor, int]:
    """(the weight after llama.cpp's quantizer -> gguf.quants.dequantize, in its own dtype; packed bytes)."""
    import numpy as np
    import torch

    w = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    if type_name == "F16":
        back, nbytes = w.astype(np.float16).astype(np.float32), w.size * 2
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        from qeval.quant.backends import ggml_lib

        packed = ggml_lib.quantize(w, type_name)
        back, nbytes = dequantize(packed, GGMLQuantizationType[type_name]).reshape(w.shape), packed.nbytes
    return torch.from_numpy(np.ascontiguousarray(back)).to(device=weight.device, dtype=weight.dtype), int(nbytes)


def _apply(ftype: str, pure: bool, fmt_name: str):
    def after_load(model, device: str, compute_dtype: torch.dtype) -> None:
        import torch

        types = tensor_types(model, ftype, pure)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, (_, t) in types.items():
                m = modules[name]
                new, nbytes = roundtrip(m.weight, t)
                m.weight.copy_(new)
                # the footprint: quantized, simulated, its packed size, its ggml type (the packed_types
                # census) and the theory of that type, not the ftype's
                mark(m, packed_bytes=nbytes, packed_type=t, theory_bits=bits(t))
        census = Counter(t for _, t in types.values())
        fell = sum(1 for want, t in types.values() if want != t)
        log.info("%s: tensor types %s (%d of %d tensors on a shape fallback type)", fmt_name,
                 ", ".join(f"{k} x{v}" for k, v in sorted(census.items())), fell, len(types))
    return after_load


def parse(scheme: str, options: tuple[str, ...], backend) -> QuantFormat:
    ftype = ALIASES.get(scheme, scheme)
    pure = False
    for o in options:
        if o == "pure":
            pure = True
        else:
            raise bad_option(f"gguf:{scheme}", o, "no option, or pure (every tensor the ftype's own type, "
                                                  "as llama-quantize --pure)")
    name = f"gguf:{ftype}" + (":pure" if pure else "")
    base = FTYPES[ftype]
    words = (f"every linear weight {base}" if pure else f"llama.cpp's {ftype.upper()} mix (default {base})")
    return QuantFormat(
        name, f"GGUF {ftype.upper()}: {words}, rows not a multiple of {TYPE_LAYOUT[base][0]} fall back as "
              "llama.cpp does; llama.cpp's quantizer (ggml), simulated compute",
        # for listings: the default type on a row of that width (a mix varies per tensor; the footprint's
        # theory is computed tensor by tensor)
        lambda in_features, b=base: bits(fallback(b, in_features)), lambda compute_dtype: None, backend="gguf",
        after_load=_apply(ftype, pure, name), kernel="simulated",
        storage="float weights holding the dequantized GGUF values", can_save=False, lora_trainable=True,
        options=(("ftype", ftype.upper()), ("pure", pure), ("quantizer", "ggml_quantize_chunk"),
                 ("rules", RULES_VERSION), ("source", f"{_src()}")),
        packages=("gguf",), requires=backend, divides=0)


def _src() -> str:
    from qeval.quant.backends.ggml_lib import SOURCE_DIST, SOURCE_VERSION

    return f"{SOURCE_DIST}=={SOURCE_VERSION}"
