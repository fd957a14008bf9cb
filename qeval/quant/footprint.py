"""Measure what a loaded model holds: every parameter and buffer, quantized or not, in bytes.

Generic over backends: each module is offered to the registered backends' `account`
(qeval.quant.backend), and the one that claims it says which parameter holds its codes, which
tensors are its scales / zero points and what it would take packed; this module only counts bytes
(shared storage once) and sums the theory. torch is imported when a model is measured, not before.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qeval.quant.backend import BACKENDS, Held

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Footprint:
    """Measured bytes of a loaded model (every parameter and buffer, shared storage counted once)."""

    total_bytes: int
    quantized_weight_bytes: int  # packed low-bit linear weights
    quant_state_bytes: int  # absmax / scales / codebooks that dequantization needs
    unquantized_bytes: int  # everything left in float: embeddings, norms, skipped modules
    theory_bytes: int  # what the format's arithmetic promises for the same model
    quantized_params: int  # number of weights that were quantized
    census: dict[str, int]  # "ParamType:dtype" -> bytes, for dtype-census checks
    # Simulated formats only: the bytes the quantized weights take in the format's real packed
    # layout, measured from the backend's own packer (GGUF: the gguf.quants output); else 0.
    packed_bytes: int = 0
    # Backends that pick a type per tensor (GGUF mixes): type -> number of quantized weights held in it
    packed_types: dict[str, int] = dataclasses.field(default_factory=dict)
    # The checkpoint the model was loaded from, as stored (qeval.models.load.checkpoint_of): its float
    # dtype ("bfloat16"; a GGUF-converted folder: the float type it was dequantized to), the bytes of
    # its tensors, and for a GGUF conversion the file's tensors per type. Sizes are read against these
    # bytes, not the compute dtype's copy (a bf16 checkpoint computed in float32 on CPU is twice as big).
    checkpoint_dtype: str = ""
    checkpoint_bytes: int = 0
    checkpoint_types: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def quantizable_linears(model: Any) -> list[tuple[str, Any]]:
    """The linear layers every backend quantizes: all but the output head (tied to the embedding in
    SmolLM2; bitsandbytes and QLoRA keep it in float too, see bnb.SKIP_MODULES)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and n.split(".")[-1] != "lm_head"]


def is_subclass_tensor(t: Any) -> bool:
    """torchao / quanto weights: tensor subclasses whose storage lives in inner plain tensors."""
    import torch

    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


def is_quantized_param(param: Any) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params") or is_subclass_tensor(param)


def flatten_tensor(t: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(path, plain tensor) for every tensor a subclass weight stores, recursively (quanto nests a
    PackedTensor inside its weight); a plain tensor is itself."""
    import torch

    if not is_subclass_tensor(t):
        return [(prefix, t)]
    names, _ = t.__tensor_flatten__()
    out: list[tuple[str, torch.Tensor]] = []
    for n in names:
        inner = getattr(t, n, None)
        if torch.is_tensor(inner):
            out += flatten_tensor(inner, f"{prefix}.{n}" if prefix else n)
    return out


def account(module: Any) -> Held | None:
    """What `module` holds as a quantized module, said by the backend that claims it; None: float."""
    for _, backend in BACKENDS.items():
        if backend.account is not None and (held := backend.account(module)) is not None:
            return held
    return None


def measure_footprint(model: Any, fmt: Any) -> Footprint:
    """The bytes `model` holds, split by what the backends account as quantized; the theory from
    `fmt` (a QuantFormat: its bits per weight) where a module does not say its own."""
    seen: set[tuple[int, int]] = set()

    def nbytes(t: "torch.Tensor") -> int:
        # Tied weights (SmolLM2's embedding/lm_head) share storage: count it once.
        ident = (t.untyped_storage().data_ptr(), t.numel())
        if ident in seen:
            return 0
        seen.add(ident)
        return t.numel() * t.element_size()

    qweights = qstate = unquant = qparams = theory = packed = 0
    census: dict[str, int] = {}
    packed_types: dict[str, int] = {}
    for module in model.modules():
        held = account(module)
        for name, p in module.named_parameters(recurse=False):
            quantized = held is not None and name == held.param
            if quantized:
                b_data = sum(nbytes(t) for t in (held.data if held.data is not None else (p,)))
                b_state = sum(nbytes(t) for t in held.state)
            else:
                b_data, b_state = nbytes(p), 0
            b = b_data + b_state
            key = f"{type(p).__name__}:{str(p.dtype).replace('torch.', '')}"
            census[key] = census.get(key, 0) + b
            if quantized:
                qweights += b_data
                qparams_here = module.in_features * module.out_features
                qparams += qparams_here
                qstate += b_state + sum(nbytes(t) for t in held.side)
                # a backend that chose this tensor's type (GGUF mixes) or whose state dtype follows the
                # compute dtype (hqq) says its bits, else the format's
                tensor_bits = held.theory_bits
                if tensor_bits is None and fmt.bits_per_weight is not None:
                    tensor_bits = fmt.bits_per_weight(module.in_features)
                if tensor_bits is not None:
                    theory += round(qparams_here * tensor_bits / 8)
                packed += held.packed_bytes
                if held.packed_type is not None:
                    packed_types[held.packed_type] = packed_types.get(held.packed_type, 0) + qparams_here
            else:
                unquant += b
                theory += b if b else 0
        for _, buf in module.named_buffers(recurse=False):
            b = nbytes(buf)
            unquant += b
            theory += b
    return Footprint(total_bytes=qweights + qstate + unquant, quantized_weight_bytes=qweights,
                     quant_state_bytes=qstate, unquantized_bytes=unquant, theory_bytes=theory,
                     quantized_params=qparams, census=dict(sorted(census.items())), packed_bytes=packed,
                     packed_types=dict(sorted(packed_types.items())))
