"""optimum-quanto formats: `quanto:int8`, `quanto:int4[:gN]`, `quanto:int2[:gN]`, `quanto:float8`.

`optimum.quanto.quantize(model, weights=qintN, exclude=[output head])` then `freeze(model)`: the
weights become `WeightQBytesTensor` (int8, fp scale per row) or `WeightQBitsTensor` (4/2-bit codes
packed into uint8, with a float scale and a float shift per group). Real packed storage.

Group size: quanto picks one per layer (128 when it divides the layer's input width, else 96, 64
or 32: 96 for SmolLM2's 576-wide layers, 128 for the 1536-wide down projection); `:gN` sets one
size for every layer and is validated against the model's shapes before anything runs. Theory
counts the fp32 scale and shift per group on CPU (on CUDA they are bf16: half that overhead).
`quanto:float8`: `qfloat8_e4m3fn` weights, float8 e4m3 codes with one scale per row (a
`WeightQBytesTensor` like int8); it runs on CPU (measured: float32 and bf16, the codes dequantized
for the matmul), so it is the FP8 format a machine without an SM89+ GPU can measure.
Left out: saving (quanto's tensors are not serializable through save_pretrained here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from qeval.quant.backends import subclass
from qeval.quant.formats import BACKENDS, Backend, QuantFormat, bad_option, group_option, quantizable_linears

if TYPE_CHECKING:
    import torch

SCHEMES = ("int8", "int4", "int2", "float8")


def quanto_default_group(in_features: int) -> int | None:
    """quanto's own per-layer choice (optimum/quanto/nn/qmodule.py, QModuleMixin.__init__)."""
    group = 128
    if in_features > group:
        while in_features % group != 0 and group > 32:
            group -= 32
        if in_features % group == 0:
            return group
    return None


def _bits(n: int, group: int | None):
    def bits(in_features: int) -> float:
        g = group or quanto_default_group(in_features) or in_features  # None: one group per row
        return n + 64 / g  # fp32 scale + fp32 shift per group
    return bits


_UNPACK: list = []  # qeval's registration of quanto::unpack on CPU (kept alive: dropping it unregisters)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's CPU unpack of 4- or 2-bit codes packed into uint8: value i of a byte is bits
    [bits*i, bits*(i+1)), the values concatenated along dim 0 -- the same mask, shift and cat as
    quanto's C++ kernel (optimum/quanto/library/extensions/cpp/unpack.cpp)."""
    import torch

    return torch.cat([(packed & (((1 << bits) - 1) << (bits * i))) >> (bits * i) for i in range(8 // bits)], 0)


def unpack_in_torch() -> None:
    """Serve quanto::unpack on CPU from `unpack_codes` instead of quanto's C++ extension, which torch
    JIT-compiles with g++ on first use in every fresh environment: ~53 s, measured as the first
    quanto:int4 cell of a cold `make report` (62.5 s, against 9.9 s once built). Its kernel is these
    three torch ops in C++, so the codes and every number are the same."""
    if _UNPACK:
        return
    import warnings

    import optimum.quanto  # noqa: F401 -- registers quanto::unpack and its CPU kernel first
    import torch

    lib = torch.library.Library("quanto", "IMPL")
    with warnings.catch_warnings():  # torch warns that a kernel is overridden: that is the point
        warnings.simplefilter("ignore")
        lib.impl("unpack", unpack_codes, "CPU", allow_override=True)
    _UNPACK.append(lib)


def _apply(n, group: int | None):
    def after_load(model, device: str, compute_dtype: torch.dtype) -> None:
        import torch
        from optimum.quanto import freeze, qfloat8_e4m3fn, qint2, qint4, qint8, quantize

        unpack_in_torch()

        targets = {name for name, _ in quantizable_linears(model)}
        exclude = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in targets]
        quantize(model, weights={8: qint8, 4: qint4, 2: qint2, "f8": qfloat8_e4m3fn}[n], exclude=exclude or None)
        if group is not None:
            for name, m in model.named_modules():
                if name in targets and hasattr(m, "weight_group_size"):
                    m.weight_group_size = group  # read when freeze() quantizes the weight
        freeze(model)
    return after_load


def _parse(scheme: str, options: tuple[str, ...]) -> QuantFormat:
    if scheme == "float8":
        if options:
            raise bad_option("quanto:float8", options[0], "no options (float8 uses one scale per row)")
        return QuantFormat(
            "quanto:float8", "optimum-quanto float8 e4m3 weights, fp scale per row", lambda in_features: 8 + 32 / in_features,
            lambda compute_dtype: None, backend="quanto", after_load=_apply("f8", None), kernel="real",
            storage="float8_e4m3fn codes + scale per row (WeightQBytesTensor)", can_save=False, lora_trainable=False,
            options=(("weights", "qfloat8_e4m3fn"),), packages=("optimum-quanto",), requires=BACKENDS.get("quanto"))
    n = int(scheme[3:])
    if n == 8 and options:
        raise bad_option("quanto:int8", options[0], "no options (int8 uses one scale per row)")
    group = None if n == 8 else group_option(f"quanto:{scheme}", options, None)
    name = f"quanto:{scheme}" + ("" if group is None else f":g{group}")
    if n == 8:
        bits = lambda in_features: 8 + 32 / in_features  # noqa: E731
        desc, storage = "int8 weights, fp scale per row", "int8 codes + scale per row (WeightQBytesTensor)"
    else:
        bits = _bits(n, group)
        gdesc = f"group {group}" if group else "quanto's per-layer group (128, else 96/64/32)"
        desc = f"int{n} weights packed in uint8, fp scale + shift per {gdesc}"
        storage = f"{n}-bit codes packed into uint8 + scale/shift per group (WeightQBitsTensor)"
    return QuantFormat(name, f"optimum-quanto {desc}", bits, lambda compute_dtype: None, backend="quanto",
                       after_load=_apply(n, group), kernel="real", storage=storage, can_save=False,
                       lora_trainable=True, options=(("bits", n), ("group", group)),
                       packages=("optimum-quanto",), requires=BACKENDS.get("quanto"), divides=group or 0)


BACKENDS.add("quanto", Backend(
    "quanto", "optimum-quanto (Hugging Face's PyTorch quantization toolkit)", _parse, SCHEMES,
    modules=("optimum.quanto",), extra="quanto", option_help="quanto schemes: int8, int4[:gN], int2[:gN], float8",
    colour="tab:green", account=subclass.account, dequantize=subclass.dequantize))
