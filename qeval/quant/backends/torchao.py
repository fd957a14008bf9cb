"""torchao formats: `torchao:int8-wo`, `torchao:int8-dyn`, `torchao:int4-wo[:gN]`, `torchao:int2-wo[:gN]`;
on CUDA `torchao:int4-tinygemm[:gN]` and `torchao:int4-hqq[:gN]`; the float formats (`torchao:fp8-wo`,
`torchao:fp8-dyn`, `torchao:nvfp4-wo`, `torchao:mxfp8`, `torchao:mxfp4`) are in qeval.quant.backends.torchao_float.

One verb over a config (`torchao.quantization.quantize_(model, config, filter_fn)`) applied to the
loaded float model, every linear layer but the (tied) output head, as bitsandbytes does.

- int8-wo: `Int8WeightOnlyConfig`, int8 per-row weights, activations stay float. Real storage.
- int8-dyn: `Int8DynamicActivationInt8WeightConfig`, int8 weights and per-token dynamically
  quantized int8 activations. Real storage.
- intN-wo:gG: `IntxWeightOnlyConfig(weight_dtype=torch.intN, granularity=PerGroup(G))`, default g32.
  torchao's x86 wheel has no packed CPU kernel: the codes are stored one per int8 byte
  (`IntxUnpackedToInt8Tensor`), ~9 bits/weight measured against 4 + 32/G in theory, so it is marked
  "simulated" with both numbers shown.

GPU-only (CUDA, bfloat16, compute capability >= 8.0; `needs_cuda`: one exit-2 line elsewhere):
- int4-tinygemm[:gG]: `Int4WeightOnlyConfig(group_size=G, int4_packing_format="tile_packed_to_4d")`,
  torchao's packed int4 for the tinygemm kernel (`aten._weight_int4pack_mm`), asymmetric min/max per
  group, default g128 (tinygemm's groups: 32, 64, 128, 256). Real storage: two codes per byte plus a
  bf16 scale and zero point per group; tinygemm pads each row to a multiple of 1024 weights (and the
  rows to a multiple of 8), so a 576-wide layer holds 1024 columns: theory counts that padding.
- int4-hqq[:gG]: the same storage and kernel, scale and zero point chosen by torchao's port of HQQ
  (`int4_choose_qparams_algorithm="hqq"`), not by the hqq package (see `hqq:4bit`).
Neither saves (no serialization here) nor trains LoRA (no dequantize / backward for this tensor).

LoRA trains on every CPU scheme here (peft's TorchaoLoraLinear; measured on the tiny model: the held-out
loss falls, and both merge paths work, int4-wo included: tests/test_lora_bases.py).

Theory counts the symmetric format's fp32 scale per row (int8) or per group; torchao also stores an
(all-zero) int8 zero point beside each scale, which the measured bytes include (0.2% for int8).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qeval.quant.backends import subclass, torchao_float
from qeval.quant.formats import BACKENDS, Backend, QuantFormat, group_option, quantizable_linears

if TYPE_CHECKING:
    import torch

SCHEMES = ("int8-wo", "int8-dyn", "int4-wo", "int2-wo", "int4-tinygemm", "int4-hqq") + torchao_float.SCHEMES
TINYGEMM = ("int4-tinygemm", "int4-hqq")  # CUDA only
TINYGEMM_GROUPS = (32, 64, 128, 256)  # what the tinygemm kernel takes
TINYGEMM_PAD = 1024  # tinygemm pads in_features to a multiple of this (Int4TilePackedTo4dTensor.from_hp)


def tinygemm_bits(in_features: int, group: int) -> float:
    """Bits per (unpadded) weight: 4-bit codes + bf16 scale and zero per group, over the padded row."""
    padded = -(-in_features // TINYGEMM_PAD) * TINYGEMM_PAD
    return (4 + 32 / group) * padded / in_features


def _config(scheme: str, group: int | None):
    import torch
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8-wo":
        return Int8WeightOnlyConfig()
    if scheme == "int8-dyn":
        return Int8DynamicActivationInt8WeightConfig()
    if scheme in TINYGEMM:
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d",
                                    int4_choose_qparams_algorithm="hqq" if scheme == "int4-hqq" else "tinygemm",
                                    set_inductor_config=False)
    bits = int(scheme[3])
    return IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group))


def _apply(scheme: str, group: int | None):
    def after_load(model, device: str, compute_dtype: torch.dtype) -> None:
        from torchao.quantization import quantize_

        targets = {id(m) for _, m in quantizable_linears(model)}
        quantize_(model, _config(scheme, group), filter_fn=lambda m, fqn: id(m) in targets)
    return after_load


def _parse(scheme: str, options: tuple[str, ...]) -> QuantFormat:
    if scheme in torchao_float.SCHEMES:  # FP8 / NVFP4 / MX: qeval.quant.backends.torchao_float
        return torchao_float.parse(scheme, options)
    int8 = scheme.startswith("int8")
    if int8 and options:
        from qeval.quant.formats import bad_option

        raise bad_option(f"torchao:{scheme}", options[0], "no options (int8 uses one scale per row)")
    group = None if int8 else group_option(f"torchao:{scheme}", options, 128 if scheme in TINYGEMM else 32)
    name = f"torchao:{scheme}" + ("" if group is None else f":g{group}")
    if scheme in TINYGEMM:
        import dataclasses

        from qeval.core.errors import QevalError

        if group not in TINYGEMM_GROUPS:
            raise QevalError(f"quantization format {name} option", f"g{group}", "a tinygemm group size: " +
                             ", ".join(f"g{g}" for g in TINYGEMM_GROUPS), f"e.g. torchao:{scheme}:g64")
        how = "torchao's HQQ port (optimized zero points)" if scheme == "int4-hqq" else "min/max"
        return QuantFormat(
            name, f"torchao int4 for the tinygemm CUDA kernel, bf16 scale + zero per group of {group} ({how}); "
                  "rows padded to a multiple of 1024", lambda in_features, g=group: tinygemm_bits(in_features, g),
            lambda compute_dtype: None, backend="torchao", after_load=_apply(scheme, group), kernel="real",
            storage="int4 codes packed for tinygemm + bf16 scale/zero per group (Int4TilePackedTo4dTensor)",
            can_save=False, lora_trainable=False, options=(("scheme", scheme), ("group", group)),
            packages=("torchao",), requires=dataclasses.replace(BACKENDS.get("torchao"), needs_cuda=True),
            divides=group)
    if int8:
        bits = lambda in_features: 8 + 32 / in_features  # noqa: E731
        desc = ("int8 weights, per-row fp32 scale, float activations" if scheme == "int8-wo" else
                "int8 weights (per-row scale) x int8 activations quantized per token at run time")
        kernel, storage = "real", "int8 codes + fp32 scale per row (Int8Tensor)"
    else:
        n = int(scheme[3])
        bits = lambda in_features, n=n, g=group: n + 32 / g  # noqa: E731
        desc = f"int{n} weights, fp32 scale per group of {group}, stored unpacked (one code per int8)"
        kernel, storage = "simulated", f"one int{n} code per int8 byte (IntxUnpackedToInt8Tensor): no packed CPU kernel"
    # intN on CPU holds one code per int8 byte, an fp32 scale and an int8 zero point per group
    held = None if int8 else (lambda in_features, float_bits, g=group: 8 + 40 / g)
    return QuantFormat(name, f"torchao {desc}", bits, lambda compute_dtype: None, backend="torchao",
                       after_load=_apply(scheme, group), kernel=kernel, storage=storage, can_save=True,
                       lora_trainable=True, options=(("scheme", scheme), ("group", group)),
                       packages=("torchao",), requires=BACKENDS.get("torchao"), divides=group or 0,
                       held_bits=held)


BACKENDS.add("torchao", Backend(
    "torchao", "PyTorch-native quantization (quantize_ over a config)", _parse, SCHEMES,
    modules=("torchao.quantization",), extra="torchao",
    option_help="torchao schemes: int8-wo, int8-dyn, int4-wo[:gN], int2-wo[:gN]; fp8-wo, nvfp4-wo; CUDA: int4-tinygemm[:gN], int4-hqq[:gN], fp8-dyn, mxfp8, mxfp4",
    colour="tab:orange", account=subclass.account, dequantize=subclass.dequantize))
