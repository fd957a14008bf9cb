"""Quantization formats: one registry of names a user types, one verb to measure what a format costs.

A format is a frozen value (`QuantFormat`): its name, a description, the theoretical bits each
quantized linear weight costs, and a builder that returns the exact `quantization_config` transformers
applies at load time (None for the baseline). Backends register formats with `@quant_format(...)`
beside their implementation (see `bnb.py`); `none` is an ordinary entry.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qeval.registry import Registry


@dataclass(frozen=True)
class QuantFormat:
    name: str
    description: str
    # bits per quantized weight as a function of the linear layer's in_features (int8's per-row scale
    # amortises over a row); None means the format quantizes nothing.
    bits_per_weight: Callable[[int], float] | None
    build: Callable[[torch.dtype], Any]
    backend: str = "none"
    # Called on the loaded model with (model, device, compute_dtype): runtime settings the
    # quantization_config cannot express. Its `runtime_spec` is part of every result key.
    after_load: Callable[[Any, str, torch.dtype], None] | None = None
    runtime_spec: tuple[tuple[str, Any], ...] = ()

    def quantization_config(self, compute_dtype: torch.dtype) -> Any:
        return self.build(compute_dtype)

    def spec(self, compute_dtype: torch.dtype) -> dict:
        """Everything about this format that determines the numbers, as canonical JSON data."""
        cfg = self.quantization_config(compute_dtype)
        options = {} if cfg is None else _jsonable(cfg.to_dict())
        return {"name": self.name, "backend": self.backend, "compute_dtype": str(compute_dtype),
                "options": options, "runtime": dict(self.runtime_spec)}


FORMATS: Registry[QuantFormat] = Registry("quantization format")
# The formats a default plan measures, in the order reports list them (baseline first).
DEFAULT_FORMATS = ("none", "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq")


def quant_format(name: str, description: str, bits_per_weight: Callable[[int], float] | None = None,
                 backend: str = "none", after_load=None, runtime_spec: dict | None = None):
    """Decorator: register the function that builds `name`'s quantization_config."""

    def deco(build: Callable[[torch.dtype], Any]) -> Callable[[torch.dtype], Any]:
        FORMATS.add(name, QuantFormat(name, description, bits_per_weight, build, backend, after_load,
                                      tuple(sorted((runtime_spec or {}).items()))))
        return build

    return deco


@quant_format("none", "the full-precision baseline (float32 on CPU, bfloat16 on CUDA)")
def _none(compute_dtype: torch.dtype) -> None:
    return None


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in obj]
        return sorted(items, key=str) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, torch.dtype):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


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

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quant_state_tensors(param: Any) -> list[torch.Tensor]:
    """The tensors beside a quantized weight that dequantization needs (bitsandbytes layouts)."""
    out: list[torch.Tensor] = []
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


def is_quantized_param(param: Any) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def measure_footprint(model: torch.nn.Module, fmt: QuantFormat) -> Footprint:
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor) -> int:
        # Tied weights (SmolLM2's embedding/lm_head) share storage: count it once.
        ident = (t.untyped_storage().data_ptr(), t.numel())
        if ident in seen:
            return 0
        seen.add(ident)
        return t.numel() * t.element_size()

    qweights = qstate = unquant = qparams = theory = 0
    census: dict[str, int] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            b = nbytes(p)
            key = f"{type(p).__name__}:{str(p.dtype).replace('torch.', '')}"
            census[key] = census.get(key, 0) + b
            if is_quantized_param(p):
                qweights += b
                qparams_here = module.in_features * module.out_features
                qparams += qparams_here
                qstate += sum(nbytes(t) for t in _quant_state_tensors(p))
                if fmt.bits_per_weight is not None:
                    theory += round(qparams_here * fmt.bits_per_weight(module.in_features) / 8)
            else:
                unquant += b
                theory += b if b else 0
        for _, buf in module.named_buffers(recurse=False):
            b = nbytes(buf)
            unquant += b
            theory += b
    return Footprint(total_bytes=qweights + qstate + unquant, quantized_weight_bytes=qweights,
                     quant_state_bytes=qstate, unquantized_bytes=unquant, theory_bytes=theory,
                     quantized_params=qparams, census=dict(sorted(census.items())))


from qeval.quant import bnb  # noqa: E402,F401  (registers the bitsandbytes formats)
