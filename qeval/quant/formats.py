"""Quantization formats: one registry of the names a user types.

A format is a frozen value (`QuantFormat`): its name, a description, the theoretical bits each
quantized linear weight costs, and either a builder that returns the exact `quantization_config`
transformers applies at load time (bitsandbytes) or an `after_load` step that quantizes the loaded
float model in place (torchao, quanto, GGUF). `none` is an ordinary entry (qeval.quant.backends.none).

Names. A format is `backend:scheme[:options]` (`torchao:int8-wo`, `quanto:int4:g64`, `gguf:q4_0`),
parsed by the backend's `Backend.parse`; a few fixed names are presets (`bnb-nf4`, ...; their record
keys are unchanged from before backends existed). Each backend declares what it needs (Python
packages with the pip extra that installs them, CUDA, calibration data) and each format what it is:
theoretical bits per weight, whether compute uses the format's real low-bit storage or simulates its
numerics in float ("simulated"), whether it can be saved and reloaded, whether LoRA can train on it.
`QuantFormat.require(device)` turns a missing package into one line (`pip install 'qeval[torchao]'`)
before anything is computed. What a backend is, and what generic code asks it, is the contract in
qeval.quant.backend; measuring a loaded model is qeval.quant.footprint (re-exported here). No torch
at import: formats are listed, parsed and keyed without it.
"""
from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from qeval.core.errors import QevalError, did_you_mean
# the formats a default plan measures, in report order: defined once with the other shared names
from qeval.core.names import DEFAULT_FORMATS
from qeval.core.registry import Registry
from qeval.quant.backend import BACKENDS, Backend, parseable  # noqa: F401  (BACKENDS, Backend: re-exported)
# re-exported: the footprint verbs and the linear layers every backend quantizes (import torch when called)
from qeval.quant.footprint import (Footprint, flatten_tensor, is_quantized_param, measure_footprint,  # noqa: F401
                                   quantizable_linears)

if TYPE_CHECKING:
    import torch


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
    # --- what the format is (shown in the report; see the module docstring) ---
    kernel: str = "real"  # real: computes from the format's own storage | simulated: float weights or unpacked ints
    storage: str = ""  # how the weights are held in memory, in words
    can_save: bool = True  # save_pretrained + reload gives the same model
    lora_trainable: bool = True  # peft LoRA trains on top of it (QLoRA-style)
    # Backend formats only (empty for the presets, whose keys must not change): options that
    # determine the numbers, and the Python distributions whose versions do.
    options: tuple[tuple[str, Any], ...] = ()
    packages: tuple[str, ...] = ()
    requires: "Backend | None" = None
    # the in_features every quantized layer's must be divisible by (a group / block size), or 0
    divides: int = 0
    # Simulated formats: bits one quantized weight really takes in memory, from (in_features, the
    # float compute dtype's bits); None: the theory (packed storage). The training-memory estimate
    # uses it, so a QLoRA-style base is predicted at what it holds, not at what it promises.
    held_bits: Callable[[int, int], float] | None = None

    def memory_bits(self, in_features: int, float_bits: int) -> float:
        """Bits per quantized weight held in memory while the model runs."""
        if self.bits_per_weight is None:
            return float(float_bits)
        if self.held_bits is not None:
            return float(self.held_bits(in_features, float_bits))
        return float(self.bits_per_weight(in_features))

    def quantization_config(self, compute_dtype: torch.dtype) -> Any:
        return self.build(compute_dtype)

    def spec(self, compute_dtype: torch.dtype) -> dict:
        """Everything about this format that determines the numbers, as canonical JSON data."""
        cfg = self.quantization_config(compute_dtype)
        options = {} if cfg is None else _jsonable(cfg.to_dict())
        out = {"name": self.name, "backend": self.backend, "compute_dtype": str(compute_dtype),
               "options": options, "runtime": dict(self.runtime_spec)}
        if self.options or self.packages:  # backend formats: their options and package versions
            out["options"] = _jsonable(dict(self.options))
            out["backend_versions"] = {p: _version(p) for p in self.packages}
        return out

    def require(self, device: str = "cpu") -> "QuantFormat":
        """Raise one clear QevalError when this format cannot run here (a package or CUDA missing)."""
        if self.requires is not None:
            self.requires.require(self.name, device)
        return self

    def check_shapes(self, in_features: dict[str, int], model: str) -> list[QevalError]:
        """Problems with this format's group/block size for a model's linear layers (name -> in_features)."""
        if not self.divides:
            return []
        bad = {n: f for n, f in in_features.items() if f % self.divides}
        if not bad:
            return []
        what = ", ".join(f"{n} ({f})" for n, f in sorted(bad.items()))
        ok = sorted({g for g in (16, 32, 64, 96, 128, 192, 256) if all(f % g == 0 for f in in_features.values())})
        return [QevalError(f"format {self.name} on model {model}", f"group/block size {self.divides}",
                           f"a size that divides every quantized layer's input width; {what} is not a multiple",
                           "sizes that divide every layer: " + (", ".join(map(str, ok)) or "none of the usual ones"))]


def bad_option(fmt: str, option: str, expected: str) -> QevalError:
    return QevalError(f"quantization format {fmt} option", option, expected, "e.g. quanto:int4:g64")


def group_option(fmt: str, options: tuple[str, ...], default: int | None) -> int | None:
    """Parse the one option most backends take, a group size `gN`."""
    group = default
    for o in options:
        if len(o) > 1 and o[0] == "g" and o[1:].isdigit() and int(o[1:]) >= 8:
            group = int(o[1:])
        else:
            raise bad_option(fmt, o, "a group size gN (N >= 8, e.g. g32, g64)")
    return group


class FormatRegistry(Registry[QuantFormat]):
    """Presets by name, plus `backend:scheme[:options]` parsed by the backend (and memoized)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self._parsed: dict[str, QuantFormat] = {}

    def get(self, name: str) -> QuantFormat:
        if name in self._items:
            return self._items[name]
        if name in self._parsed:
            return self._parsed[name]
        if not isinstance(name, str) or ":" not in name:
            return super().get(name)  # the standard unknown-name error, listing presets and schemes
        backend_name, scheme, *options = name.split(":")
        if backend_name not in parseable():
            raise QevalError("unknown quantization backend", backend_name, "one of " + ", ".join(parseable()),
                             did_you_mean(backend_name, parseable()) or f"formats look like {_EXAMPLE}")
        backend = BACKENDS.get(backend_name)
        if scheme not in backend.schemes:
            raise QevalError(f"unknown {backend_name} scheme", scheme, "one of " + ", ".join(backend.schemes),
                             did_you_mean(scheme, backend.schemes) or backend.option_help)
        fmt = backend.parse(scheme, tuple(options))
        self._parsed[name] = fmt
        return fmt

    def __contains__(self, name: object) -> bool:
        try:
            self.get(name)  # type: ignore[arg-type]
            return True
        except QevalError:
            return False

    def __iter__(self):
        """Every name a user can type without options: presets, then backend:scheme."""
        return iter(list(self._items) + [f"{b}:{s}" for b, be in BACKENDS.items() for s in be.schemes])

    def items(self) -> list[tuple[str, QuantFormat]]:
        return [(n, self.get(n)) for n in self]


_EXAMPLE = "backend:scheme[:options], e.g. torchao:int8-wo, quanto:int4:g64, gguf:q4_0"

FORMATS: FormatRegistry = FormatRegistry("quantization format")


def format_order(name: str) -> tuple:
    """The order reports list formats in: the baseline, the bitsandbytes presets (decreasing bits),
    then every other format grouped by backend (in registration order), by name. One key for every
    table, so the same format sits on the same line everywhere."""
    if name in DEFAULT_FORMATS:
        return (DEFAULT_FORMATS.index(name), 0, str(name))
    backend = str(name).split(":")[0]
    known = parseable()
    return (len(DEFAULT_FORMATS), known.index(backend) if backend in known else len(known), str(name))


def quant_format(name: str, description: str, bits_per_weight: Callable[[int], float] | None = None,
                 backend: str = "none", after_load=None, runtime_spec: dict | None = None):
    """Decorator: register the function that builds `name`'s quantization_config."""

    def deco(build: Callable[[torch.dtype], Any]) -> Callable[[torch.dtype], Any]:
        FORMATS.add(name, QuantFormat(name, description, bits_per_weight, build, backend, after_load,
                                      tuple(sorted((runtime_spec or {}).items()))))
        return build

    return deco


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_jsonable(v) for v in obj]
        return sorted(items, key=str) if isinstance(obj, (set, frozenset)) else items
    torch = sys.modules.get("torch")  # a torch.dtype can only be here when torch is loaded
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


