"""Checks that need each model's config or tokenizer (never its weights), run by the driver after
the matrix is expanded and before the store is opened.

`validate` (qeval.run.plan) checks what the plan alone says; this checks the plan against each
model: an adapter's or the calibration set's `seq_len` against the model's context
(`max_position_embeddings` in config.json), and whether the training / calibration data give a
full block at that `seq_len` once tokenized. Without it these surfaced only when the adapter's job
ran -- after the plan's other cells were computed and stored.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from qeval.core.config import raise_if
from qeval.core.errors import QevalError

if TYPE_CHECKING:
    from qeval.run.plan import Resolved


def model_context(folder: Path) -> int | None:
    """The longest sequence the model's config allows (None when it does not say)."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # check_folder reports a bad config; a converted model always has one
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = cfg.get(key) if isinstance(cfg, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def preflight(models: list, rp: Resolved) -> None:
    """Every problem of the plan against each model in `models` (ResolvedModels), together."""
    errors: list[QevalError] = []
    from qeval.train.spec import seed_base

    used = {seed_base(a.adapter) for a in rp.arms if a.adapter}  # `lora#s7` trains adapter `lora`
    adapters = {n: s for n, s in rp.plan.adapters.items() if n in used}  # the plan's names, before seeds
    calibrated = any(str(a.quant).startswith("gptq:") for a in rp.arms)
    for model in models:
        ctx = model_context(model.path)
        for name, spec in adapters.items():
            if ctx is not None and spec.seq_len > ctx:
                errors.append(QevalError(f"adapters.{name}.seq_len", spec.seq_len,
                                         f"at most model {model.spec}'s context of {ctx:,} tokens (max_position_embeddings)",
                                         "lower seq_len"))
        if calibrated and ctx is not None and rp.calibration.seq_len > ctx:
            errors.append(QevalError("calibration.seq_len", rp.calibration.seq_len,
                                     f"at most model {model.spec}'s context of {ctx:,} tokens", "lower calibration.seq_len"))
        to_train = {n: s for n, s in adapters.items() if untrained(model, s, rp.device)}
        if (to_train or calibrated) and not errors:
            errors += _data_problems(model, to_train, rp, calibrated)
    raise_if(errors)


def untrained(model, spec, device: str) -> bool:
    """Whether some training of `spec` (one per seed) has no stored artifact yet. A stored one was
    trained from this very data (its content hash is in the key), so its data needs no check: a warm
    run skips tokenizing the training data (4.3 s of every warm `qeval run` of the default plan)."""
    from qeval.core import env
    from qeval.train.spec import adapter_key, expand_seeds

    specs = expand_seeds({"adapter": spec}, [])[0].values()
    return any(not (env.adapter_dir(adapter_key(model, s, device)) / "qeval-artifact.json").exists() for s in specs)


def _data_problems(model, adapters: dict, rp: Resolved, calibrated: bool) -> list[QevalError]:
    """The training and calibration data against seq_len, tokenized by the model's tokenizer."""
    from transformers import AutoTokenizer

    from qeval.data.train_data import prepare

    tokenizer = AutoTokenizer.from_pretrained(str(model.path))
    out: list[QevalError] = []
    done = set()
    for name, spec in adapters.items():
        what = (spec.train_data, spec.seq_len, spec.packing)
        if what in done:
            continue
        done.add(what)
        try:
            prepare(spec.train_data, tokenizer, spec.seq_len, spec.packing)
        except QevalError as e:
            for err in getattr(e, "errors", [e]):
                label = f"adapters.{name}.{err.what}" if err.what == "seq_len" else err.what
                out.append(QevalError(f"{label} (model {model.spec}, train_data {spec.train_data})", err.value,
                                      err.expected, err.fix))
    if calibrated:
        from qeval.quant.backends.gptq import calibration_blocks

        try:
            calibration_blocks(rp.calibration, tokenizer)
        except QevalError as e:
            out += getattr(e, "errors", [e])
    return out
