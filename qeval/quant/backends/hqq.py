"""HQQ formats (Half-Quadratic Quantization, the `hqq` package): `hqq:4bit[:gN]`, `8bit`, `3bit`, `2bit`, `1bit`.

Every linear layer but the (tied) output head is replaced by hqq's own `HQQLinear`, quantized with
hqq's own settings (`BaseQuantizeConfig(nbits, group_size)`: asymmetric codes per group of N
consecutive weights along a row, `axis=1`; a float scale (min/max) and zero point per group, the
zero point then refined by hqq's proximal optimizer, lp = 0.7, at most 20 iterations with early
stop; for 4 bits the starting zero is rounded, as hqq does). No calibration data. Default group
64 (hqq's default).

Real packed storage: the codes are bit-packed by hqq (8 and 4 bits in uint8, 2 bits four per uint8,
1 bit eight per uint8, 3 bits ten per int32, i.e. 3.2 bits each), the scale and zero point are held
in the model's compute dtype (float32 on CPU, bfloat16 on CUDA). Compute is hqq's PYTORCH backend:
each forward unpacks the codes and computes with the dequantized weight (`x @ ((W_q - z) * s).T`);
no fused low-bit matmul on CPU, as bitsandbytes' 4-bit on CPU. On CUDA the same backend runs (a
fused kernel needs hqq's separately built `hqq_aten`, or gemlite/bitblas; torchao's tinygemm runs
torchao's port of HQQ: `torchao:int4-hqq`).

Speed on CPU. hqq's optimizer runs ~15 small elementwise tensor operations per iteration; with
torch's default intra-op threads on a loaded 2-core machine each one waits on a descheduled thread
(measured: 15.5 s per decoder layer of SmolLM2-135M with 2 threads under a load of ~4, 1.4-2.3 s
with 1 thread): that, not float16 or hqq itself, was the "~4 s per layer". Quantization therefore
runs on one thread on CPU (the codes, scales and zeros are the same on any thread count: a test
checks it), then the thread count is restored.

LoRA trains on it (peft's `HqqLoraLinear`: gradients flow through hqq's autograd function) and both
merge paths work (dequantize -> merge; then hqq quantizes the merged weights again). Not saved:
`save_pretrained` cannot write hqq layers here (transformers 5.24's `HqqConfig` raises
NotImplementedError), so `can_save` is False.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from qeval.core.errors import QevalError
from qeval.quant.backend import Held, mark, marked
from qeval.quant.formats import BACKENDS, Backend, QuantFormat, group_option, quantizable_linears

if TYPE_CHECKING:
    import torch

SCHEMES = ("8bit", "4bit", "3bit", "2bit", "1bit")
DEFAULT_GROUP = 64  # hqq's BaseQuantizeConfig default
# nbits -> (codes per storage word, bits of that word): hqq's Quantizer.bit_to_packing
PACKING = {8: (1, 8), 4: (2, 8), 3: (10, 32), 2: (4, 8), 1: (8, 8)}


def code_bits(nbits: int) -> float:
    """Bits one code takes in hqq's packed layout (3 bits: 10 codes per int32 = 3.2)."""
    per, word = PACKING[nbits]
    return word / per


def theory_bits(nbits: int, group: int, state_bits: int = 32) -> float:
    """Bits per weight: the packed code + a scale and a zero point (`state_bits` each) per group."""
    return code_bits(nbits) + 2 * state_bits / group


@contextlib.contextmanager
def _threads(n: int | None):
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def quant_config(nbits: int, group: int) -> dict:
    """hqq's own config for a layer (its defaults for everything but nbits and the group)."""
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=nbits, group_size=group, axis=1)


def _apply(nbits: int, group: int):
    def after_load(model, device: str, compute_dtype: torch.dtype) -> None:
        import torch
        from hqq.core.quantize import HQQBackend, HQQLinear

        HQQLinear.set_backend(HQQBackend.PYTORCH)  # dequantize + matmul, with backward (LoRA)
        cfg = quant_config(nbits, group)
        state_bits = torch.finfo(compute_dtype).bits
        modules = dict(model.named_modules())
        cpu = not str(device).startswith("cuda")
        with _threads(1 if cpu else None), torch.no_grad():
            for name, lin in quantizable_linears(model):
                q = HQQLinear(lin, cfg, del_orig=True, compute_dtype=compute_dtype, device=str(device))
                # the footprint's theory of this layer as held (scale/zero in compute_dtype)
                mark(q, theory_bits=theory_bits(nbits, group, state_bits), simulated=False)
                parent, _, child = name.rpartition(".")
                setattr(modules[parent] if parent else model, child, q)
    return after_load


def _parse(scheme: str, options: tuple[str, ...]) -> QuantFormat:
    nbits = int(scheme[:-3])
    group = group_option(f"hqq:{scheme}", options, DEFAULT_GROUP)
    if group % 8:
        raise QevalError(f"quantization format hqq:{scheme} option", options[-1],
                         "a group size that is a multiple of 8 (hqq's rule)", f"e.g. hqq:{scheme}:g64")
    name = f"hqq:{scheme}:g{group}"
    per, word = PACKING[nbits]
    packing = "one per uint8" if per == 1 else f"{per} per {'int32' if word == 32 else 'uint8'}"
    return QuantFormat(
        name, f"HQQ {nbits}-bit codes ({packing}), scale + zero point per group of {group} in the compute "
              "dtype (fp32 on CPU, bf16 on CUDA); zero point optimized, no calibration data",
        lambda in_features, n=nbits, g=group: theory_bits(n, g), lambda compute_dtype: None, backend="hqq",
        after_load=_apply(nbits, group), kernel="real",
        storage=f"{nbits}-bit codes packed {packing} + scale/zero per group in the compute dtype (HQQLinear, "
                "dequantized per forward)",
        can_save=False, lora_trainable=True, options=(("nbits", nbits), ("group", group), ("axis", 1)),
        packages=("hqq",), requires=BACKENDS.get("hqq"), divides=group)


def _is_hqq(module: Any) -> bool:
    return type(module).__name__ == "HQQLinear"


def account(module: Any) -> Held | None:
    """HQQLinear: packed codes in the parameter W_q, scale / zero point in its `meta` dict (not
    parameters or buffers)."""
    import torch

    if not _is_hqq(module) or not isinstance(getattr(module, "meta", None), dict):
        return None
    m = marked(module)
    return Held("W_q", side=tuple(t for t in module.meta.values() if torch.is_tensor(t)),
                theory_bits=m.theory_bits if m is not None else None)


def dequantize(model: Any, dtype: Any) -> Any:
    """Replace every HQQLinear by a float Linear holding hqq's own dequantized weight."""
    import torch

    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if not _is_hqq(layer):
                continue
            w = layer.dequantize()
            lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                                  device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w.to(dtype))
                if layer.bias is not None:
                    lin.bias.copy_(layer.bias.detach().to(dtype))
            setattr(parent, name, lin)
    return model


def lora_targets(model: Any) -> set[str] | None:
    """peft's "all-linear" finds nn.Linear subclasses only; hqq's layers (every linear but the head,
    see quantizable_linears) are the same set, named explicitly."""
    hqq = {n for n, m in model.named_modules() if _is_hqq(m)}
    return (hqq | {n for n, _ in quantizable_linears(model)}) if hqq else None


BACKENDS.add("hqq", Backend(
    "hqq", "HQQ (Half-Quadratic Quantization: calibration-free, optimized zero points)", _parse, SCHEMES,
    modules=("hqq.core.quantize",), extra="hqq",
    option_help="hqq schemes: 8bit, 4bit, 3bit, 2bit, 1bit, each with an optional group gN (default g64)",
    colour="tab:brown", account=account, dequantize=dequantize, lora_targets=lora_targets))
