"""The backend contract: everything qeval knows about one quantization library, declared in its file.

A `Backend` is a frozen value registered in `BACKENDS` under the prefix users type (`bnb`, `torchao`,
`gguf`, ...). It declares

- its formats: the schemes `parse` turns into a `QuantFormat` (`backend:scheme[:options]`), and what
  they need (Python packages with the pip extra, CUDA, calibration text, an outside check);
- its identity in records and reports: `label` (what `QuantFormat.backend` records: "bitsandbytes"
  for `bnb`, kept from before backends existed) and `colour` (the report's plots);
- byte accounting: `account(module)` says what a quantized module of this backend holds (`Held`):
  which parameter carries the codes, which tensors are scales / zero points, the module's theory
  bits when they differ from the format's, and for simulated formats the bytes of the real packed
  layout. `qeval.quant.footprint.measure_footprint` asks the backends and knows none of them;
- merges: `dequantize(model, dtype)` turns its quantized layers back into float `Linear`s (None:
  no merge path), `mergeable(fmt)` narrows that per format;
- LoRA: `lora_targets(model)`, the module names LoRA's "all-linear" means on this backend's layers
  when peft cannot find them itself (None: peft's own choice).

Per-format capabilities (real or simulated compute, can save, can train LoRA) are fields of the
`QuantFormat` the backend's `parse` builds; CUDA-only is `needs_cuda` here.

Simulating backends (GGUF, GPTQ) keep float weights that hold the format's values; they `mark` each
quantized module with what it really costs (`Mark`), and their `account` is `marked_account`.

Importing this module imports no torch (listings, labels and colours stay cheap).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

from qeval.core.errors import QevalError
from qeval.core.registry import Registry


@dataclass(frozen=True)
class Held:
    """What one quantized module holds, as its backend accounts it (bytes are measured generically)."""

    param: str = "weight"  # the parameter holding the quantized weight (hqq: W_q)
    data: tuple | None = None  # that parameter's tensors holding the codes (None: the parameter itself)
    state: tuple = ()  # that parameter's tensors holding scales / zero points (tensor subclasses)
    side: tuple = ()  # tensors beside the parameter that dequantization needs (bnb quant_state, hqq meta)
    theory_bits: float | None = None  # this module's bits per weight, when not the format's
    packed_bytes: int = 0  # simulated formats: the bytes of the real packed layout
    packed_type: str | None = None  # backends that pick a type per tensor (GGUF mixes)


@dataclass(frozen=True)
class Mark:
    """What a quantized module costs, recorded on it by the backend that quantized it."""

    packed_bytes: int = 0
    packed_type: str | None = None
    theory_bits: float | None = None
    simulated: bool = True  # float weights holding the format's values (the `weight` is the quantized one)


MARK_ATTR = "qeval_quant_mark"  # the one attribute a backend sets on a module it quantized


def mark(module: Any, packed_bytes: int = 0, packed_type: str | None = None, theory_bits: float | None = None,
         simulated: bool = True) -> None:
    setattr(module, MARK_ATTR, Mark(int(packed_bytes), packed_type, theory_bits, simulated))


def marked(module: Any) -> Mark | None:
    return getattr(module, MARK_ATTR, None)


def marked_account(module: Any) -> Held | None:
    """The accounting of a simulating backend: a marked module's float `weight` is its quantized weight."""
    m = marked(module)
    if m is None or not m.simulated:
        return None
    return Held("weight", theory_bits=m.theory_bits, packed_bytes=m.packed_bytes, packed_type=m.packed_type)


@dataclass(frozen=True)
class Backend:
    """One quantization library: what it needs, how it turns `scheme[:options]` into a format, and
    what the generic code (footprint, merges, LoRA, reports) asks it."""

    name: str
    description: str
    parse: Callable[[str, tuple[str, ...]], Any] | None = None  # (scheme, options) -> QuantFormat
    schemes: tuple[str, ...] = ()  # the schemes `parse` knows, for listings and "did you mean"
    modules: tuple[str, ...] = ()  # import names that must be importable
    extra: str = ""  # the pip extra of qeval that installs them
    needs_cuda: bool = False
    calibration: bool = False  # needs calibration text (the plan's `calibration:`; gptq)
    option_help: str = ""
    # (format name) -> a QevalError when something outside this env is missing (gptq: its isolated venv)
    check: Callable[[str], QevalError | None] | None = None
    label: str = ""  # QuantFormat.backend of its formats, as records and reports show it ('' = name)
    colour: str = "gray"  # matplotlib colour of its formats in the report's plots
    account: Callable[[Any], Held | None] | None = None  # (module) -> what it holds, or None: not ours
    dequantize: Callable[[Any, Any], Any] | None = None  # (model, float dtype) -> model with float Linears
    mergeable: Callable[[Any], bool] | None = None  # (QuantFormat) -> can merge; None: every LoRA base
    lora_targets: Callable[[Any], Any] | None = None  # (model) -> "all-linear" names, or None: peft's

    @property
    def shown(self) -> str:
        return self.label or self.name

    def require(self, fmt_name: str, device: str) -> None:
        missing = [m for m in self.modules if find_spec(m.split(".")[0]) is None or find_spec(m) is None]
        if missing:
            raise QevalError(f"quantization format {fmt_name}", "needs " + ", ".join(missing),
                             f"the {self.name} backend's packages installed",
                             f"pip install 'qeval[{self.extra or self.name}]'")
        if self.needs_cuda and not str(device).startswith("cuda"):
            raise QevalError(f"quantization format {fmt_name}", f"device {device}", "a CUDA GPU",
                             "this format needs CUDA; run it with --device cuda on a GPU machine")
        if self.check is not None and (problem := self.check(fmt_name)) is not None:
            raise problem

    def can_merge(self, fmt: Any) -> bool:
        """A LoRA adapter on `fmt` can be merged (dequantized, then re-quantized by this backend)."""
        return (self.dequantize is not None and fmt.lora_trainable
                and (self.mergeable is None or self.mergeable(fmt)))


def find_spec(name: str):
    """The spec of module `name` if it is installed, None if not, importing nothing: importlib's
    find_spec imports the parents of a dotted name, and `torchao.quantization` cost every warm
    `qeval run` 5.7 s of importing torchao (torch._dynamo) to validate the plan. One seam for tests
    that simulate a missing package."""
    import importlib.machinery

    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    for i in range(2, len(parts) + 1):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i]), list(spec.submodule_search_locations))
    return spec


BACKENDS: Registry[Backend] = Registry("quantization backend")


def backend_of(fmt: Any) -> Backend | None:
    """The backend of a format: the one it requires, else the one whose label it records."""
    if getattr(fmt, "requires", None) is not None:
        return fmt.requires
    return by_label(fmt.backend)


def by_label(label: str) -> Backend | None:
    for _, b in BACKENDS.items():
        if b.shown == label:
            return b
    return None


def backend_colour(label: str) -> str:
    """The report colour of the backend a format records as `label` (gray when none is registered)."""
    b = by_label(label)
    return b.colour if b is not None else "gray"


def backend_colours() -> dict[str, str]:
    """label -> colour for every registered backend (the plots' legend)."""
    return {b.shown: b.colour for _, b in BACKENDS.items()}


def parseable() -> list[str]:
    """The backends a user can name in `backend:scheme` (those with schemes; `none` has none)."""
    return [n for n, b in BACKENDS.items() if b.schemes]
