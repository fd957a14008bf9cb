"""The adapter recipe as data: `AdapterSpec` (how to fine-tune), its key, its peft LoraConfig, seed
labels, and which bases LoRA trains on / merges into (the bases' backends declare it).

No torch at import (a plan validates and lists adapters without loading a model): peft and the
models layer are imported by the functions that need them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qeval.core import env
from qeval.core.errors import QevalError
from qeval.core.files import content_key
from qeval.core.names import MAX_BATCH, MAX_SEED, MAX_STEPS
from qeval.quant.backend import backend_of
from qeval.quant.formats import FORMATS

if TYPE_CHECKING:
    from qeval.models.load import ResolvedModel

METHODS = ("lora", "full")
MERGES = ("none", "dequantized", "requantized")
# 3: user training data (content hash in the key), labels masked per format, budgets in tokens,
#    early stopping, peft passthrough, time per step without the held-out passes
ADAPTER_SCHEMA = 3
# LoraConfig fields a plan may not set through `peft:` (the spec's own keys, or qeval's to decide)
PEFT_OWN = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}
PEFT_INTERNAL = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode")
# not converged: held-out loss still fell by more than CONVERGED_TOL (relative) over the last
# CONVERGED_EVALS held-out evaluations
CONVERGED_EVALS, CONVERGED_TOL = 3, 0.01
# spec fields added after adapters were keyed: left out of the identity at these values, so the
# same option trains the same adapter under the same key as before the field existed
IDENTITY_DEFAULTS = {"cross_entropy": "full", "optimizer": "adamw", "offload_activations": False}


@dataclass(frozen=True)
class AdapterSpec:
    """How to fine-tune. QLoRA is `method: lora` with `train_quant: bnb-nf4-dq`."""

    method: str = "lora"  # lora | full (full fine-tune: the reference arm, float base only)
    train_quant: str = "none"  # precision of the base during training
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"  # every linear layer of the blocks (QLoRA paper)
    lr: float = 2e-4  # LoRA's usual rate; a full fine-tune wants ~1e-5
    steps: int = 30  # CPU default: minutes; raise on a GPU. Ignored when budget_tokens is set
    budget_tokens: int = 0  # > 0: train on this many tokens (steps = ceil(tokens / (batch_size x seq_len)))
    batch_size: int = 4
    seq_len: int = 128  # CPU default; 512+ on a GPU
    warmup_steps: int = 3
    seed: int = 1234
    train_data: str = "lee_background"  # a built-in name (qeval.data.train_data.BUILTIN) or a .jsonl file / folder
    packing: str = "pack"  # pack | truncate: what happens to rows longer than seq_len (qeval.data.train_data)
    # true | false | auto (on only when the projected peak without it passes half the device's
    # memory: qeval.train.recipe.checkpointing). Trades a recomputed forward (~1/3 more time) for
    # far less activation memory; the trained weights are the same either way (non-reentrant)
    gradient_checkpointing: bool | str = True
    # full (the model's own loss) | chunked:N | fused:N: the loss over N chunks of tokens, so the
    # batch's fp32 logits never exist at once (qeval.train.loss; memory: qeval.train.estimate)
    cross_entropy: str = "full"
    # adamw (torch) | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes: 8-bit states, ~2 bytes
    # per trainable parameter instead of 8; paged: the states in CUDA unified memory, CUDA only)
    optimizer: str = "adamw"
    # true: the activations autograd keeps for backward live in host memory during the forward and
    # come back for the backward (torch's save_on_cpu; torchtune's offloading). CUDA only
    offload_activations: bool = False
    eval_every: int = 5  # held-out loss every N steps
    early_stopping_patience: int = 0  # > 0: stop after this many held-out evaluations without a new best
    domain_tasks: tuple[str, ...] = ()  # the tasks this training targets; every other task measures forgetting
    seeds: tuple[int, ...] = ()  # train each arm once per seed (replaces `seed`): the verdict then carries the spread
    peft: dict = dataclasses.field(default_factory=dict)  # more LoraConfig options (use_dora, init_lora_weights...)

    @property
    def train_steps(self) -> int:
        """Optimizer steps: from the token budget when one is given."""
        if self.budget_tokens > 0:
            return -(-self.budget_tokens // (self.batch_size * self.seq_len))
        return self.steps

    def identity(self) -> dict:
        """What determines the trained weights (the adapter's and its cells' keys): everything but
        `domain_tasks`, which only says how the results are read."""
        d = dataclasses.asdict(self)
        d.pop("domain_tasks")
        for name, default in IDENTITY_DEFAULTS.items():
            if d[name] == default:  # a memory option added later: at its default, the keys of before
                d.pop(name)
        return d

    def problems(self, where: str) -> list[QevalError]:
        from qeval.core.errors import unknown_name
        from qeval.data.train_data import PACKINGS, read_rows, resolve

        out = []
        if self.method not in METHODS:
            out.append(unknown_name(f"{where}.method", self.method, METHODS))
        if self.train_quant not in FORMATS:
            out.append(unknown_name(f"{where}.train_quant", self.train_quant, FORMATS))
        elif self.method == "full" and self.train_quant != "none":
            out.append(QevalError(f"{where}.train_quant", self.train_quant,
                                  "'none' for a full fine-tune (quantized weights cannot be trained)",
                                  "use method: lora for a quantized base (QLoRA)"))
        elif problem := lora_base_problem(self.train_quant, f"{where}.train_quant"):
            out.append(problem)
        try:  # the data is read and checked now, before any model loads
            read_rows(resolve(self.train_data, f"{where}.train_data"))
        except QevalError as e:
            out += getattr(e, "errors", [e])
        try:
            from qeval.train.estimate import parse_cross_entropy

            parse_cross_entropy(self.cross_entropy)
        except QevalError as e:
            out.append(QevalError(f"{where}.cross_entropy", self.cross_entropy, "full, chunked:N or fused:N "
                                  "(N > 0 chunks of tokens)", "e.g. chunked:8 (torchtune's chunked loss)"))
        from qeval.train.estimate import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            out.append(unknown_name(f"{where}.optimizer", self.optimizer, OPTIMIZERS))
        if not isinstance(self.offload_activations, bool):
            out.append(QevalError(f"{where}.offload_activations", self.offload_activations, "true or false"))
        if not isinstance(self.gradient_checkpointing, bool) and self.gradient_checkpointing != "auto":
            out.append(QevalError(f"{where}.gradient_checkpointing", self.gradient_checkpointing, "true, false or auto",
                                  "auto: checkpoint only when memory needs it"))
        if self.packing not in PACKINGS:
            out.append(unknown_name(f"{where}.packing", self.packing, PACKINGS))
        for name in ("r", "alpha", "steps", "batch_size", "seq_len", "eval_every"):
            if getattr(self, name) < 1:
                out.append(QevalError(f"{where}.{name}", getattr(self, name), "a positive integer"))
        for name in ("budget_tokens", "early_stopping_patience", "warmup_steps"):
            if getattr(self, name) < 0:
                out.append(QevalError(f"{where}.{name}", getattr(self, name), "0 (off) or a positive integer"))
        if not 0 <= self.dropout < 1:
            out.append(QevalError(f"{where}.dropout", self.dropout, "a value in [0, 1)"))
        if not 0 < self.lr < float("inf"):
            out.append(QevalError(f"{where}.lr", self.lr, "a positive, finite learning rate"))
        for name, top in (("steps", MAX_STEPS), ("batch_size", MAX_BATCH), ("budget_tokens", MAX_STEPS * MAX_BATCH)):
            if getattr(self, name) > top:  # a typo that would fail (or run for weeks) only once training starts
                out.append(QevalError(f"{where}.{name}", getattr(self, name), f"at most {top:,}"))
        if not 0 <= self.seed <= MAX_SEED:
            out.append(QevalError(f"{where}.seed", self.seed, f"0 to {MAX_SEED:,}"))
        if len(set(self.seeds)) != len(self.seeds) or any(not 0 <= x <= MAX_SEED for x in self.seeds):
            out.append(QevalError(f"{where}.seeds", list(self.seeds), f"distinct seeds, 0 to {MAX_SEED:,}"))
        if self.peft:
            if self.method != "lora":
                out.append(QevalError(f"{where}.peft", sorted(self.peft), "no peft options for method: full",
                                      "remove peft:, or use method: lora"))
            else:
                out += peft_problems(self, where)
        return out

    def device_problems(self, where: str, device: str) -> list[QevalError]:
        """Options that need a CUDA device, refused on CPU before anything runs."""
        if device.startswith("cuda"):
            return []
        out = []
        if self.optimizer.startswith("paged"):
            out.append(QevalError(f"{where}.optimizer", self.optimizer, "a CUDA device (paged optimizer states live "
                                  "in CUDA unified memory; bitsandbytes falls back to unpaged on CPU)",
                                  f"use {self.optimizer.removeprefix('paged_')} on cpu"))
        if self.offload_activations:
            out.append(QevalError(f"{where}.offload_activations", True, "a CUDA device (on CPU the activations are "
                                  "already in host memory)", "drop offload_activations on cpu"))
        if self.peft.get("init_lora_weights") == "loftq":
            out.append(QevalError(f"{where}.peft.init_lora_weights", "loftq", "a CUDA device (peft computes the "
                                  "LoftQ initialisation on the GPU)", "run this adapter with device: cuda, or drop LoftQ on CPU"))
        return out

    def domain_problems(self, where: str, tasks: list[str]) -> list[QevalError]:
        """`domain_tasks` must name tasks of the suite."""
        from qeval.core.errors import unknown_name

        return [unknown_name(f"{where}.domain_tasks task", t, tasks, "a task of the plan's suite")
                for t in self.domain_tasks if t not in tasks]


SEED_TAG = "#s"  # an arm trained with seed 7 from adapter `lora` is `lora#s7` (arm and adapter names)


def seed_base(name: str) -> str:
    """The plan's name of a seed-expanded arm or adapter label (`lora#s7@merged-float` -> `lora@merged-float`)."""
    import re

    return re.sub(re.escape(SEED_TAG) + r"\d+", "", str(name))


def expand_seeds(adapters: dict[str, AdapterSpec], arms: list) -> tuple[dict[str, AdapterSpec], list]:
    """An adapter with `seeds: [a, b]` becomes adapters `name#sa`, `name#sb` (each its own `seed`),
    and every arm using it one arm per seed: several trainings per arm, the spread in the report."""
    out = {}
    for name, spec in adapters.items():
        if spec.seeds:
            for sd in spec.seeds:
                out[f"{name}{SEED_TAG}{sd}"] = dataclasses.replace(spec, seed=sd, seeds=())
        else:
            out[name] = spec
    new_arms = []
    for arm in arms:
        spec = adapters.get(arm.adapter) if getattr(arm, "adapter", None) else None
        if spec is not None and spec.seeds:
            new_arms += [dataclasses.replace(arm, name=f"{arm.name}{SEED_TAG}{sd}", adapter=f"{arm.adapter}{SEED_TAG}{sd}")
                         for sd in spec.seeds]
        else:
            new_arms.append(arm)
    return out, new_arms


def lora_config(spec: AdapterSpec) -> Any:
    """The peft LoraConfig of a spec: its own keys, plus the `peft:` passthrough."""
    from peft import LoraConfig

    target = list(spec.target_modules) if isinstance(spec.target_modules, tuple) else spec.target_modules
    kwargs = {"bias": "none", **spec.peft}
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type="CAUSAL_LM",
                      target_modules=target, **kwargs)


def peft_problems(spec: AdapterSpec, where: str) -> list[QevalError]:
    """Check `peft:` against peft's own LoraConfig: its field names (did-you-mean), the literal
    values it declares (init_lora_weights), then LoraConfig's own checks."""
    import typing

    from peft import LoraConfig

    from qeval.core.errors import unknown_name

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    allowed = [n for n in fields if n not in PEFT_OWN and n not in PEFT_INTERNAL]
    out = []
    for k, v in spec.peft.items():
        if k in PEFT_OWN:
            out.append(QevalError(f"{where}.peft.{k}", v, f"the spec's own key {PEFT_OWN[k]!r}",
                                  f"set `{PEFT_OWN[k]}:` instead of peft.{k}"))
        elif k in PEFT_INTERNAL:
            out.append(QevalError(f"{where}.peft.{k}", v, "a training option (qeval sets this one)", "remove it"))
        elif k not in fields:
            out.append(unknown_name(f"{where}.peft key (a peft LoraConfig field)", k, allowed))
    if out:
        return out
    init = spec.peft.get("init_lora_weights")
    if isinstance(init, str):
        hint = typing.get_type_hints(LoraConfig).get("init_lora_weights")
        literals = [a for arg in typing.get_args(hint) for a in typing.get_args(arg) if isinstance(a, str)]
        ok = init in literals or any(x.endswith("]") and init.startswith(x.split("[")[0]) for x in literals)
        if literals and not ok:
            out.append(unknown_name(f"{where}.peft.init_lora_weights", init, literals, "or true / false"))
    if init == "loftq" and spec.train_quant != "none":
        out.append(QevalError(f"{where}.peft.init_lora_weights", init, "a float base (train_quant: none): "
                              "LoftQ initialises from the full-precision weights",
                              "train LoftQ on train_quant: none and evaluate it on the 4-bit arm"))
    if not out:
        try:
            lora_config(spec)
        except (ValueError, TypeError) as e:
            out.append(QevalError(f"{where}.peft", spec.peft, f"options peft's LoraConfig accepts ({str(e).splitlines()[0]})"))
    return out


def not_converged(heldout: list | tuple) -> bool:
    """True when the held-out loss was still falling by more than CONVERGED_TOL (relative) over the
    last CONVERGED_EVALS evaluations: more budget would likely have helped."""
    losses = [float(x[1]) for x in heldout]
    if len(losses) <= CONVERGED_EVALS:
        return len(losses) > 1 and losses[-1] < losses[0] * (1 - CONVERGED_TOL)
    then = losses[-1 - CONVERGED_EVALS]
    return then > 0 and (then - losses[-1]) / then > CONVERGED_TOL


def adapter_key(model: ResolvedModel, spec: AdapterSpec, device: str) -> str:
    """Content hash of what determines an adapter: model, recipe, the training data's content
    (not its path), library versions and device kind."""
    from qeval.data.train_data import resolve

    versions = {k: v for k, v in env.versions().items() if k in ("torch", "transformers", "peft", "bitsandbytes")}
    recipe = spec.identity()
    src = resolve(spec.train_data)
    if not src.builtin:  # the same rows moved elsewhere are the same adapter
        recipe["train_data"] = "local"
    material = {"schema": ADAPTER_SCHEMA, "model": model.fingerprint, "spec": recipe, "data": src.hash,
                "versions": versions, "device": "cuda" if device.startswith("cuda") else "cpu"}
    fmt = FORMATS.get(spec.train_quant)
    if fmt.options or fmt.packages:  # a backend base (torchao, quanto, gguf): its options and package versions
        from qeval.models.load import compute_dtype

        material["base_format"] = fmt.spec(compute_dtype(device))  # (bnb presets: keys unchanged)
    return content_key(material)


def lora_base_problem(fmt_name: str, where: str) -> QevalError | None:
    """Why a LoRA adapter can not train on (or be attached to) `fmt_name`; None when its backend
    declares LoRA support (`QuantFormat.lora_trainable`)."""
    fmt = FORMATS.get(fmt_name)
    if fmt.lora_trainable:
        return None
    return QevalError(where, fmt_name, f"a base whose backend declares LoRA training ({fmt.backend} does not "
                      f"for this format: {fmt.storage or fmt.description})",
                      "use one that does, e.g. bnb-nf4-dq, torchao:int8-wo, quanto:int4, gguf:q4_0 (qeval formats)")


def merge_problem(fmt_name: str, where: str) -> QevalError | None:
    """Why a LoRA adapter on `fmt_name` can not be merged (dequantized or re-quantized); None when it
    can: its backend dequantizes it and declares LoRA support for it (`Backend.can_merge`; not the
    baseline, not bitsandbytes' LLM.int8: no dequantize path here)."""
    fmt = FORMATS.get(fmt_name)
    backend = backend_of(fmt)
    if backend is not None and backend.can_merge(fmt):
        return None
    return QevalError(where, fmt_name, "a quantized base with LoRA support to dequantize, merge into and re-quantize "
                      "(bnb 4-bit, torchao int8, quanto, GGUF, HQQ)", "merge paths exist for QLoRA-style arms on those bases")
