"""The record of one cell, typed: what `qeval.run.record.build_record` writes, the store keeps as
JSON, and comparison, report and nightly read.

Every part is a frozen dataclass read with `from_json` and written back with `to_json`. The stored
JSON is the format (its canonical form is what SQLite holds), so two rules keep every store readable
and every key unchanged:
- a field that older qevals did not write has a default, and the part remembers that the key was
  absent (`absent`), so the record writes back exactly as it was read (no key appears);
- a key this qeval does not know (a newer qeval wrote it) is kept in `extra` and written back, so a
  newer store read and rewritten here loses nothing.

Pure python: the store layer must not pull torch or pandas into what reads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Callable, ClassVar, Mapping, TypeVar

from qeval.core.errors import QevalError
from qeval.core.names import BASELINE

P = TypeVar("P", bound="Part")


def _nested(read: Callable[[Any], Any], **kw):
    """A field whose JSON value is read by `read` (a part, a mapping of parts, an optional part)."""
    return field(metadata={"read": read}, **kw)


def _known(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in Part.OWN]


def _plain(value: Any) -> Any:
    """The JSON value of a field: parts written back, containers walked (tuples as JSON lists)."""
    if isinstance(value, Part):
        return value.to_json()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, kw_only=True)
class Part:
    """A part of a stored record: its known fields, the known keys its JSON lacked, unknown keys."""

    OWN: ClassVar[tuple[str, ...]] = ("extra", "absent")
    # keys a newer qeval wrote that this one does not know: written back as read
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # known keys the stored JSON did not have (an older qeval): left out again by to_json
    absent: frozenset[str] = field(default=frozenset(), repr=False)

    @classmethod
    def derived_defaults(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults of fields added later whose old meaning derives from other keys (see Variant.arm)."""
        return {}

    @classmethod
    def from_json(cls: type[P], d: Mapping[str, Any]) -> P:
        if not isinstance(d, Mapping):
            raise QevalError(f"stored record part {cls.__name__}", d, "a JSON object",
                             "the store was written by an incompatible qeval; pass another --store")
        kwargs, absent, derived = {}, set(), None
        for f in _known(cls):
            if f.name in d:
                read = f.metadata.get("read")
                kwargs[f.name] = read(d[f.name]) if read is not None else d[f.name]
                continue
            absent.add(f.name)
            if f.default is MISSING and f.default_factory is MISSING:
                derived = cls.derived_defaults(d) if derived is None else derived
                if f.name not in derived:
                    raise QevalError(f"stored record part {cls.__name__}", sorted(d),
                                     f"a key {f.name!r} (every qeval wrote it)",
                                     "the store was written by an incompatible qeval; pass another --store")
                kwargs[f.name] = derived[f.name]
        names = {f.name for f in _known(cls)}
        return cls(**kwargs, extra={k: v for k, v in d.items() if k not in names}, absent=frozenset(absent))

    def to_json(self) -> dict[str, Any]:
        out = {f.name: _plain(getattr(self, f.name)) for f in _known(type(self)) if f.name not in self.absent}
        out.update(self.extra)
        return out

    def stored(self, name: str) -> bool:
        """Whether the record as stored carried the key `name` (False for a field an older qeval lacked)."""
        return name not in self.absent


def _map_of(part: type[P]) -> Callable[[Mapping[str, Any]], dict[str, P]]:
    return lambda d: {k: part.from_json(v) for k, v in (d or {}).items()}


def _optional(part: type[P]) -> Callable[[Mapping[str, Any] | None], P | None]:
    return lambda d: None if d is None else part.from_json(d)


# ----------------------------------------------------------------------------- the parts

# How a merged adapter arm is labelled: the adapter's plan name, suffixed by how it was merged.
MERGE_SUFFIX = {"none": "", "dequantized": "@merged-float", "requantized": "@merged-requant"}


@dataclass(frozen=True, kw_only=True)
class Variant(Part):
    """What was evaluated: a model in a format, with or without an adapter (merged or not), as the plan's arm."""

    model: str
    quant: str
    adapter: str = ""  # the adapter's plan name; "" for none
    merge: str = "none"  # before merges existed: unmerged
    arm: str  # before arms existed: the format's name (the arm of a plain format cell)

    @classmethod
    def derived_defaults(cls, d):
        return {"arm": d.get("quant")}

    @property
    def adapter_label(self) -> str:
        """The adapter column: the adapter's plan name, suffixed by how it was merged; "" for none."""
        return self.adapter + MERGE_SUFFIX[self.merge] if self.adapter else ""

    @property
    def is_baseline(self) -> bool:
        """The unquantized model without adapter: what every other variant is compared with."""
        return self.quant == BASELINE and not self.adapter_label


@dataclass(frozen=True, kw_only=True)
class ModelRef(Part):
    """The resolved model: the plan's name, where it came from, its local path and content fingerprint."""

    spec: str = ""
    source: str = ""
    path: str = ""
    fingerprint: str


@dataclass(frozen=True, kw_only=True)
class TaskRef(Part):
    """The task as keyed: its name, the fingerprint of its documents and config, how many, how prompted."""

    name: str
    fingerprint: str = ""
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: Any = None


@dataclass(frozen=True, kw_only=True)
class Metric(Part):
    value: float
    stderr: float | None = None
    higher_is_better: bool
    aggregation: str | None = None  # lm-eval's aggregation (its registry name): picks the paired test


@dataclass(frozen=True, kw_only=True)
class Subtask(Part):
    """One member of a group task: its metrics, headline metric and document count."""

    metrics: Mapping[str, Metric] = _nested(_map_of(Metric))
    primary_metric: str
    n: int
    group: bool = False  # a nested group (its documents are its leaves')


@dataclass(frozen=True, kw_only=True)
class Timings(Part):
    load_s: float
    eval_s: float


@dataclass(frozen=True, kw_only=True)
class Footprint(Part):
    """Measured bytes of the loaded model, split by kind, beside what the format's bit width predicts."""

    total_bytes: int
    quantized_weight_bytes: int
    quant_state_bytes: int
    unquantized_bytes: int
    theory_bytes: int
    quantized_params: int
    census: Mapping[str, int] = field(default_factory=dict)
    packed_bytes: int = 0  # GGUF: bytes of the packed file's quantized tensors (before packing existed: 0)
    packed_types: Mapping[str, int] = field(default_factory=dict)  # GGUF: quantized weights per ggml type
    # the checkpoint as stored (before these existed: unknown, read as the compute dtype's baseline)
    checkpoint_dtype: str = ""
    checkpoint_bytes: int = 0
    checkpoint_types: Mapping[str, int] = field(default_factory=dict)  # GGUF-converted: the file's tensors per type


@dataclass(frozen=True, kw_only=True)
class Divergence(Part):
    """Divergence from the baseline's reference: the measured numbers (a variant), the reference's
    size (the baseline that recorded it), or only why it was not measured (`note`)."""

    kl_mean: float | None = None
    kl_p90: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agree: float | None = None
    ppl_ratio: float | None = None
    tokens: int | None = None
    seconds: float | None = None
    note: str | None = None
    role: str | None = None  # "reference": the baseline recorded the reference
    windows: int | None = None
    # llama.cpp's `--kl-divergence` statistics (qeval.eval.divergence.summarize); records written
    # before they existed lack them (None here, and the report says "not recorded (rerun)")
    kl_se: float | None = None
    kl_median: float | None = None
    kl_p95: float | None = None
    kl_p999: float | None = None
    top1_se: float | None = None
    dp_mean: float | None = None
    dp_se: float | None = None
    dp_rms: float | None = None
    dp_rms_se: float | None = None

    @property
    def measured(self) -> bool:
        return self.kl_mean is not None


@dataclass(frozen=True, kw_only=True)
class AdapterSummary(Part):
    """The trained adapter an arm evaluated (`qeval.train.artifact.AdapterArtifact.summary`). `spec`,
    `data` and `memory` stay plain mappings: their schema belongs to the training stage."""

    key: str
    path: str = ""
    device: str
    spec: Mapping[str, Any]
    trainable_params: int
    total_params: int
    adapter_bytes: int
    train_s: float
    s_per_step: float
    tokens_per_s: float
    peak_train_bytes: int
    losses: list = field(default_factory=list)
    heldout: list = field(default_factory=list)
    idle_bytes: int = 0
    steps_done: int  # before early stopping existed: every step of the recipe
    tokens: int = 0
    order_hash: str = ""
    eval_s: float = 0.0
    data: Mapping[str, Any] | None = None
    memory: Mapping[str, Any] | None = None

    @classmethod
    def derived_defaults(cls, d):
        return {"steps_done": (d.get("spec") or {}).get("steps")}


@dataclass(frozen=True, kw_only=True)
class Record(Part):
    """One cell's immutable record: its spec, numbers, costs and provenance."""

    key: str
    schema: int
    variant_id: str
    variant: Variant = _nested(Variant.from_json)
    model: ModelRef = _nested(ModelRef.from_json)
    format: Mapping[str, Any]  # the format's key material (its schema belongs to qeval.quant)
    adapter: AdapterSummary | None = _nested(_optional(AdapterSummary), default=None)
    task: TaskRef = _nested(TaskRef.from_json)
    eval: Mapping[str, Any]  # the evaluation settings' key material
    metrics: Mapping[str, Metric] = _nested(_map_of(Metric))
    primary_metric: str
    subtasks: Mapping[str, Subtask] = _nested(_map_of(Subtask), default_factory=dict)  # a group's members
    n: int
    lm_eval_config: Mapping[str, Any] = field(default_factory=dict)
    divergence: Divergence | None = _nested(_optional(Divergence), default=None)
    # which cached reference (and head) the divergence numbers came from: `qeval gc` keeps those
    divergence_reference: str | None = None
    divergence_head: str | None = None
    timings: Timings = _nested(Timings.from_json)
    peak_bytes: int
    footprint: Footprint = _nested(Footprint.from_json)
    compute_dtype: str | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    git_sha: str = ""
    device: str
    device_description: str = ""
    seed: int | None = None
    created_at: str

    @property
    def device_kind(self) -> str:
        """"cpu" or "cuda": results on one kind of device compare, across kinds they need not."""
        return self.device.split(":")[0]


# ----------------------------------------------------------------------------- speed records

SIMULATED_SPEED = "simulated: not a kernel's speed"


@dataclass(frozen=True, kw_only=True)
class SpeedRecord(Part):
    """Speed of one (model, arm) on one device (`qeval.models.speed.measure_speed`): a record kind of
    its own, in the store's `speed` table, keyed by the arm's variant, the device identity and the
    settings (never by a task), so adding it changed no accuracy cell's key."""

    key: str
    schema: int
    variant_id: str
    variant: Variant = _nested(Variant.from_json)
    model: ModelRef = _nested(ModelRef.from_json)
    format: Mapping[str, Any]
    kernel: str = "real"  # "simulated": the format computes in float; its speed is not a kernel's
    settings: Mapping[str, Any]  # qeval.models.speed.SpeedSettings.as_dict
    identity: Mapping[str, str]  # qeval.core.env.device_identity where it ran
    prefill_tok_s: float
    decode: Mapping[str, Mapping[str, float]]  # decode batch -> ttft_s, decode_tok_s, decode_s, steps
    peak_bytes: int
    peak_kind: str = ""
    seconds: float = 0.0  # the whole measurement, warm-up included (what it added to the run)
    cpu_s: float = 0.0  # the process's CPU time over it (all threads)
    versions: Mapping[str, str] = field(default_factory=dict)
    git_sha: str = ""
    device: str
    device_description: str = ""
    compute_dtype: str | None = None
    created_at: str
    kernels: str = ""  # qeval.run.cells.kernels_key: what the numbers depend on ("" before it existed)
    # Set when this arm's kernels were measured for another arm (its record's key and arm name): the
    # numbers are that measurement's, copied; `seconds` and `cpu_s` are then 0 (it cost the run nothing)
    shared_from: str = ""
    shared_arm: str = ""

    @property
    def mark(self) -> str:
        """What the report shows beside (or instead of) this speed: the simulated mark, the arm whose
        measurement it shares, or ""."""
        if self.kernel == "simulated":
            return SIMULATED_SPEED
        return f"same kernels as {self.shared_arm}: measured once" if self.shared_from else ""

    def decode_tok_s(self, batch: int = 1) -> float:
        d = self.decode.get(str(batch))
        return float("nan") if d is None else float(d["decode_tok_s"])


# ----------------------------------------------------------------------------- parity records

@dataclass(frozen=True, kw_only=True)
class ParityRecord(Part):
    """qeval's simulated GGUF formats against llama.cpp's own runtime on one model
    (`qeval.eval.parity.run_parity`): a record kind of its own, in the store's `parity` table, keyed
    by the model's fingerprint, the settings (formats, documents, context) and the runtime's build."""

    key: str
    schema: int
    model: ModelRef = _nested(ModelRef.from_json)
    settings: Mapping[str, Any]  # formats, docs, ctx
    runtime: str  # e.g. "llama-cpp-python==0.3.36"
    floor_kl: float  # KL of the float path (all-F32 file vs qeval's float model): the noise floor
    threshold: float  # a format departs above it (qeval.eval.parity.FLOOR_FACTOR x the floor)
    rows: tuple[Mapping[str, Any], ...]  # qeval.eval.parity.ParityRow as dicts, float row first
    seconds: float = 0.0
    versions: Mapping[str, str] = field(default_factory=dict)
    git_sha: str = ""
    device: str
    device_description: str = ""
    created_at: str
