"""The record of one cell: what a job yields for the driver to store (built where the job ran)."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from qeval.core import env
from qeval.run.cells import Cell, SpeedCell
from qeval.store.record import ParityRecord, Record, SpeedRecord

if TYPE_CHECKING:
    from qeval.eval.evaluate import EvalOutcome
    from qeval.models.load import LoadedModel
    from qeval.train.artifact import AdapterArtifact


def build_record(cell: Cell, loaded: LoadedModel, outcome: EvalOutcome, seed: int,
                 artifact: AdapterArtifact | None = None, git_sha: str | None = None) -> Record:
    """The immutable record of one cell: its spec, numbers, costs and provenance.

    Written as the stored JSON and read into a Record (rather than built part by part) so that what
    is stored is, key for key, what the stages produced: the key material and the summaries of
    other stages (format, task, footprint, adapter) keep any key they grow, as `extra`."""
    from qeval.store.store import SCHEMA_VERSION

    return Record.from_json({
        "key": cell.key,
        "schema": SCHEMA_VERSION,
        "variant_id": cell.variant_id,
        "variant": {"model": cell.model.spec, "quant": cell.quant, "adapter": cell.arm.adapter or "",
                    "merge": cell.arm.merge, "arm": cell.arm.name},
        "model": {"spec": cell.model.spec, "source": cell.model.source, "path": str(cell.model.path),
                  "fingerprint": cell.model.fingerprint},
        "format": cell.key_material["format"],
        "adapter": None if artifact is None else artifact.summary(),
        "task": cell.key_material["task"],
        "eval": cell.key_material["eval"],
        "metrics": {k: dataclasses.asdict(v) for k, v in outcome.metrics.items()},
        "primary_metric": outcome.primary,
        "subtasks": outcome.subtasks_record(),  # a group's members: metrics per (subtask, filter, metric)
        "n": outcome.n,
        "lm_eval_config": outcome.config,
        "divergence": divergence_record(outcome),
        # which cached reference the divergence numbers came from (`qeval gc` keeps those in use)
        "divergence_reference": cell.key_material.get("divergence", {}).get("reference"),
        "divergence_head": cell.head if "divergence" in cell.key_material else None,
        "timings": {"load_s": loaded.load_s, "eval_s": outcome.eval_s},
        "peak_bytes": max(loaded.peak_load_bytes, outcome.peak_bytes),
        "footprint": loaded.footprint.as_dict(),
        "compute_dtype": loaded.dtype,
        "versions": cell.key_material["versions"],
        "git_sha": git_sha or env.git_sha(),  # the driver's (a worker may run a copy without .git)
        "device": loaded.device,
        "device_description": env.device_description(loaded.device),
        "seed": seed,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    })


def divergence_record(outcome: EvalOutcome) -> dict | None:
    if outcome.divergence is not None:
        return {**outcome.divergence.metrics(), "seconds": outcome.divergence.seconds, "note": outcome.divergence_note}
    if outcome.reference is not None:
        return {"role": "reference", "windows": len(outcome.reference.hidden)}
    return {"note": outcome.divergence_note} if outcome.divergence_note else None


def build_speed_record(cell: SpeedCell, model, arm, loaded: LoadedModel, got: dict,
                       git_sha: str | None = None) -> SpeedRecord:
    """The speed record of one (model, arm): `got` is `qeval.models.speed.measure_speed`'s result."""
    from qeval.store.store import SCHEMA_VERSION

    return SpeedRecord.from_json({
        "key": cell.key, "schema": SCHEMA_VERSION, "variant_id": cell.variant_id,
        "variant": {"model": model.spec, "quant": cell.quant, "adapter": arm.adapter or "", "merge": arm.merge,
                    "arm": arm.name},
        "model": {"spec": model.spec, "source": model.source, "path": str(model.path), "fingerprint": model.fingerprint},
        "format": cell.key_material["format"], "kernel": loaded.fmt.kernel,
        "settings": cell.key_material["settings"], "identity": cell.key_material["identity"],
        **got, "versions": cell.key_material["versions"], "git_sha": git_sha or env.git_sha(),
        "device": loaded.device, "device_description": env.device_description(loaded.device),
        "compute_dtype": loaded.dtype, "kernels": cell.kernels,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    })


def shared_speed_record(source: SpeedRecord, cell: SpeedCell, model, arm) -> SpeedRecord:
    """The speed record of an arm whose kernels `source` measured for another arm (the same
    `cell.kernels`): its own key and variant, the measurement's numbers, marked as shared."""
    assert source.kernels == cell.kernels, "a speed is shared only between arms of the same kernels"
    d = source.to_json()
    d.update({"key": cell.key, "variant_id": cell.variant_id,
              "variant": {"model": model.spec, "quant": cell.quant, "adapter": arm.adapter or "",
                          "merge": arm.merge, "arm": arm.name},
              "format": cell.key_material["format"], "seconds": 0.0, "cpu_s": 0.0,
              "shared_from": source.shared_from or source.key, "shared_arm": source.shared_arm or source.variant.arm,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds")})
    return SpeedRecord.from_json(d)


def build_parity_record(key: str, model, settings: dict, result, seconds: float, versions: dict) -> ParityRecord:
    """The GGUF parity record of one model: `result` is `qeval.eval.parity.run_parity`'s ParityResult."""
    from qeval.store.store import SCHEMA_VERSION

    return ParityRecord.from_json({
        "key": key, "schema": SCHEMA_VERSION, "settings": settings, "runtime": result.runtime,
        "model": {"spec": model.spec, "source": model.source, "path": str(model.path), "fingerprint": model.fingerprint},
        "floor_kl": result.floor_kl, "threshold": result.threshold,
        "rows": [{**dataclasses.asdict(r), "ppl_ratio": r.ppl_ratio} for r in result.rows],
        "seconds": round(seconds, 1), "versions": versions, "git_sha": env.git_sha(),
        "device": "cpu", "device_description": env.device_description("cpu"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
    })
