"""bitsandbytes formats: LLM.int8, NF4 and FP4, each with and without double quantization.

Every option is set explicitly. transformers' defaults would, for example, run 4-bit matmuls with a
float32 compute dtype on GPU and quietly measure something other than what users deploy; the chosen
values are part of each result's key, so changing one here re-runs the affected cells.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qeval.quant.backend import Held
from qeval.quant.formats import quant_format

if TYPE_CHECKING:
    import torch

BLOCKSIZE = 64  # bitsandbytes' 4-bit block: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # double quant: the absmaxes are 8-bit, with one fp32 absmax per 256 of them
# Left in full precision: the output head. In SmolLM2 it is tied to the embedding, and quantizing it
# would quantize the embedding table as well; QLoRA also keeps it in float.
SKIP_MODULES = ["lm_head"]


def _bits_4bit(double_quant: bool):
    if double_quant:
        # 4-bit code + 8-bit absmax per block + fp32 absmax per 256 blocks = 4.127 bits
        return lambda in_features: 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * NESTED_BLOCKSIZE)
    return lambda in_features: 4 + 32 / BLOCKSIZE  # 4-bit code + fp32 absmax per block = 4.5 bits


def _config_4bit(quant_type: str, double_quant: bool, compute_dtype: torch.dtype):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,  # fp32 on CPU (bf16 is ~20x slower there), bf16 on CUDA
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=SKIP_MODULES,
    )


def keep_cpu_compute_dtype(model, device: str, compute_dtype: torch.dtype) -> None:
    """Stop bitsandbytes from silently swapping the 4-bit CPU kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks every Linear4bit at its first inference
    forward into a layout whose kernel computes in bfloat16 with bfloat16 block scales, and that
    replaces double quantization's 8-bit scales by bf16 ones. That measures a different format at
    a different compute dtype than the one configured, and differently on CPUs with and without
    the instruction set. We keep the portable path: dequantize to the compute dtype, then matmul
    (on this project's 2-core CPU it was not slower).
    """
    if device == "cpu":
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False


def _register_4bit(quant_type: str, double_quant: bool) -> None:
    name = f"bnb-{quant_type}" + ("-dq" if double_quant else "")
    dq = ", double-quantized absmax" if double_quant else ""
    desc = f"bitsandbytes {quant_type.upper()} 4-bit weights, blocksize {BLOCKSIZE}{dq}"
    quant_format(name, desc, _bits_4bit(double_quant), backend="bitsandbytes",
                 after_load=keep_cpu_compute_dtype, runtime_spec={"cpu_bf16_repack": False})(
        lambda compute_dtype: _config_4bit(quant_type, double_quant, compute_dtype))


for _qt in ("nf4", "fp4"):
    for _dq in (False, True):
        _register_4bit(_qt, _dq)


@quant_format("bnb-int8", "bitsandbytes LLM.int8(): int8 weights, per-row scales, fp16 outliers > 6.0",
              bits_per_weight=lambda in_features: 8 + 32 / in_features, backend="bitsandbytes")
def _int8(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=6.0,  # the paper's outlier threshold: larger activations take an fp16 path
        llm_int8_has_fp16_weight=False,  # inference: keep only the int8 weights
        llm_int8_skip_modules=SKIP_MODULES,
    )


def _parse(scheme: str, options: tuple[str, ...]):
    """`bnb:nf4[:dq]`, `bnb:fp4[:dq]`, `bnb:int8`: the presets under backend:scheme names (the same
    format objects, so the same record keys)."""
    from qeval.quant.formats import FORMATS, bad_option

    if scheme == "int8":
        if options:
            raise bad_option("bnb:int8", options[0], "no options")
        return FORMATS.get("bnb-int8")
    if options and options != ("dq",):
        raise bad_option(f"bnb:{scheme}", ":".join(options), "dq (double quantization) or nothing")
    return FORMATS.get(f"bnb-{scheme}" + ("-dq" if options else ""))


def quant_state_tensors(param: Any) -> list:
    """The tensors beside a quantized weight that dequantization needs (bitsandbytes layouts)."""
    import torch

    out: list = []
    qs = getattr(param, "quant_state", None)  # Params4bit
    if qs is not None:
        out += [t for t in (qs.absmax, qs.code) if torch.is_tensor(t)]
        if getattr(qs, "state2", None) is not None:  # double quantization: absmax of the absmax
            out += [t for t in (qs.state2.absmax, qs.state2.code) if torch.is_tensor(t)]
        if torch.is_tensor(getattr(qs, "offset", None)):
            out.append(qs.offset)
    scb = getattr(param, "SCB", None)  # Int8Params: one float scale per output row
    if torch.is_tensor(scb):
        out.append(scb)
    return out


def account(module: Any) -> Held | None:
    """Linear4bit / Linear8bitLt: packed codes in `weight` (Params4bit / Int8Params), absmax and
    codebooks (or SCB) in its quant state beside it."""
    w = getattr(module, "_parameters", {}).get("weight")
    if type(w).__name__ not in ("Params4bit", "Int8Params"):
        return None
    return Held("weight", side=tuple(quant_state_tensors(w)))


def dequantize(model: Any, dtype: Any) -> Any:
    """Replace every bitsandbytes Linear4bit by a float Linear holding its dequantized weights."""
    if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return model
    import bitsandbytes as bnb
    import torch

    from qeval.core.errors import QevalError

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                if getattr(child.weight.quant_state, "packing_format_for_cpu", False):
                    raise QevalError("4-bit layer", name, "bitsandbytes' portable weight layout",
                                     "load it with qeval.models.load.load_model (it keeps that layout)")
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      dtype=dtype, device=w.device)
                lin.weight.data.copy_(w)
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias.data.to(dtype))
                setattr(parent, name, lin)
    # transformers remembers the model was loaded quantized and would refuse to save it
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _register_backend() -> None:
    from qeval.quant.formats import BACKENDS, Backend

    # LLM.int8 has no dequantize path here: LoRA trains on it, but nothing merges into it
    BACKENDS.add("bnb", Backend("bnb", "bitsandbytes (LLM.int8, NF4, FP4; presets bnb-*)", _parse,
                                ("int8", "nf4", "fp4"), modules=("bitsandbytes",), extra="bnb",
                                option_help="bnb schemes: int8, nf4[:dq], fp4[:dq]", label="bitsandbytes",
                                colour="tab:blue", account=account, dequantize=dequantize,
                                mergeable=lambda fmt: "int8" not in fmt.name))


_register_backend()
