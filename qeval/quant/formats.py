"""Quantization formats: one registry of names a user types, one verb to measure what a format costs.

A format is a frozen value (`QuantFormat`): its name, a description, the theoretical bits each
quantized linear weight costs, and either a builder that returns the exact `quantization_config`
transformers applies at load time (bitsandbytes) or an `after_load` step that quantizes the loaded
float model in place (torchao, quanto, GGUF). `none` is an ordinary entry.

Names. A format is `backend:scheme[:options]` (`torchao:int8-wo`, `quanto:int4:g64`, `gguf:q4_0`),
parsed by the backend's `Backend.parse`; a few fixed names are presets (`bnb-nf4`, ...; their record
keys are unchanged from before backends existed). Each backend declares what it needs (Python
packages with the pip extra that installs them, CUDA, calibration data) and each format what it is:
theoretical bits per weight, whether compute uses the format's real low-bit storage or simulates its
numerics in float ("simulated"), whether it can be saved and reloaded, whether LoRA can train on it.
`QuantFormat.require(device)` turns a missing package into one line (`pip install 'qeval[torchao]'`)
before anything is computed.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qeval.core.errors import QevalError, did_you_mean
# the formats a default plan measures, in report order: defined once with the other shared names
from qeval.core.names import DEFAULT_FORMATS
from qeval.core.registry import Registry


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


@dataclass(frozen=True)
class Backend:
    """One quantization library: what it needs and how it turns `scheme[:options]` into a format."""

    name: str
    description: str
    parse: Callable[[str, tuple[str, ...]], QuantFormat]  # (scheme, options) -> format named canonically
    schemes: tuple[str, ...]  # the schemes `parse` knows, for listings and "did you mean"
    modules: tuple[str, ...] = ()  # import names that must be importable
    extra: str = ""  # the pip extra of qeval that installs them
    needs_cuda: bool = False
    calibration: bool = False  # needs calibration text (the plan's `calibration:`; gptq)
    option_help: str = ""
    # (format name) -> a QevalError when something outside this env is missing (gptq: its isolated venv)
    check: Callable[[str], QevalError | None] | None = None

    def require(self, fmt_name: str, device: str) -> None:
        missing = [m for m in self.modules if _find_spec(m.split(".")[0]) is None or _find_spec(m) is None]
        if missing:
            raise QevalError(f"quantization format {fmt_name}", "needs " + ", ".join(missing),
                             f"the {self.name} backend's packages installed",
                             f"pip install 'qeval[{self.extra or self.name}]'")
        if self.needs_cuda and not str(device).startswith("cuda"):
            raise QevalError(f"quantization format {fmt_name}", f"device {device}", "a CUDA GPU",
                             "this format needs CUDA; run it with --device cuda on a GPU machine")
        if self.check is not None and (problem := self.check(fmt_name)) is not None:
            raise problem


BACKENDS: Registry[Backend] = Registry("quantization backend")
_find_spec = importlib.util.find_spec  # one seam for tests that simulate a missing package


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
        if backend_name not in BACKENDS:
            raise QevalError("unknown quantization backend", backend_name, "one of " + ", ".join(BACKENDS),
                             did_you_mean(backend_name, list(BACKENDS)) or f"formats look like {_EXAMPLE}")
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
    known = list(BACKENDS)
    return (len(DEFAULT_FORMATS), known.index(backend) if backend in known else len(known), str(name))


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


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers every backend quantizes: all but the output head (tied to the embedding in
    SmolLM2; bitsandbytes and QLoRA keep it in float too, see bnb.SKIP_MODULES)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and n.split(".")[-1] != "lm_head"]


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
    # Simulated formats only: the bytes the quantized weights take in the format's real packed
    # layout, measured from the backend's own packer (GGUF: the gguf.quants output); else 0.
    packed_bytes: int = 0
    # Backends that pick a type per tensor (GGUF mixes): type -> number of quantized weights held in it
    packed_types: dict[str, int] = dataclasses.field(default_factory=dict)

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


def _hqq_state(module: Any) -> list[torch.Tensor] | None:
    """The scale / zero point tensors of an hqq HQQLinear (held in its `meta` dict, not as
    parameters or buffers); None for any other module."""
    if type(module).__name__ != "HQQLinear" or not isinstance(getattr(module, "meta", None), dict):
        return None
    return [t for t in module.meta.values() if torch.is_tensor(t)]


def is_quantized_param(param: Any) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params") or _is_subclass_tensor(param)


def _is_subclass_tensor(t: Any) -> bool:
    """torchao / quanto weights: tensor subclasses whose storage lives in inner plain tensors."""
    return type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__")


# inner tensors of a subclass weight that hold the quantized values themselves (the rest is state)
_DATA_NAMES = ("qdata", "_data", "data", "packed_weight", "int_data")


def flatten_tensor(t: torch.Tensor, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(path, plain tensor) for every tensor a subclass weight stores, recursively (quanto nests a
    PackedTensor inside its weight); a plain tensor is itself."""
    if not _is_subclass_tensor(t):
        return [(prefix, t)]
    names, _ = t.__tensor_flatten__()
    out: list[tuple[str, torch.Tensor]] = []
    for n in names:
        inner = getattr(t, n, None)
        if torch.is_tensor(inner):
            out += flatten_tensor(inner, f"{prefix}.{n}" if prefix else n)
    return out


def measure_footprint(model: torch.nn.Module, fmt: QuantFormat) -> Footprint:
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor) -> int:
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
        simulated = getattr(module, "_qeval_packed_bytes", None)  # set by simulating backends (GGUF)
        # hqq's HQQLinear: packed codes in the parameter W_q, scale/zero point in its `meta` dict
        hqq_state = _hqq_state(module)
        for name, p in module.named_parameters(recurse=False):
            quantized = is_quantized_param(p) or (simulated is not None and name == "weight") or \
                (hqq_state is not None and name == "W_q")
            if _is_subclass_tensor(p):
                parts = flatten_tensor(p)
                b_data = sum(nbytes(t) for path, t in parts if path.split(".")[0] in _DATA_NAMES)
                b_state = sum(nbytes(t) for path, t in parts if path.split(".")[0] not in _DATA_NAMES)
                b = b_data + b_state
            else:
                b_data, b_state = nbytes(p), 0
                b = b_data
            key = f"{type(p).__name__}:{str(p.dtype).replace('torch.', '')}"
            census[key] = census.get(key, 0) + b
            if quantized:
                qweights += b_data
                qparams_here = module.in_features * module.out_features
                qparams += qparams_here
                qstate += b_state + sum(nbytes(t) for t in _quant_state_tensors(p) + (hqq_state or []))
                # a backend that chose this tensor's type (GGUF mixes) or whose state dtype follows the
                # compute dtype (hqq) says its bits, else the format's
                tensor_bits = getattr(module, "_qeval_theory_bits", None)
                if tensor_bits is None and fmt.bits_per_weight is not None:
                    tensor_bits = fmt.bits_per_weight(module.in_features)
                if tensor_bits is not None:
                    theory += round(qparams_here * tensor_bits / 8)
                if simulated is not None and name == "weight":
                    packed += int(simulated)
                    ptype = getattr(module, "_qeval_packed_type", None)
                    if ptype is not None:
                        packed_types[ptype] = packed_types.get(ptype, 0) + qparams_here
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
