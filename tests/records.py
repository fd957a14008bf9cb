"""Hand-built records for tests: `make_record` fills in what every qeval writes (the keys a test does
not care about) and reads the result through `Record.from_json`, as the store would."""
from __future__ import annotations

import dataclasses
from typing import Any

from qeval.store.record import Record

FOOTPRINT = {"total_bytes": 1, "quantized_weight_bytes": 0, "quant_state_bytes": 0, "unquantized_bytes": 1,
             "theory_bytes": 1, "quantized_params": 0}
_DEFAULTS: dict[str, Any] = {
    "schema": 1, "variant_id": "v", "variant": {"model": "m", "quant": "none"}, "model": {"fingerprint": "f"},
    "format": {}, "task": {"name": "t"}, "eval": {}, "metrics": {}, "primary_metric": "acc", "n": 0,
    "timings": {"load_s": 0, "eval_s": 0}, "peak_bytes": 0, "footprint": FOOTPRINT, "device": "cpu",
    "created_at": "2026-01-01"}
_PARTS = ("variant", "model", "task", "timings", "footprint")  # given keys are merged into the defaults'


def record_json(**fields: Any) -> dict:
    """The stored JSON of a record with `fields` (the parts in _PARTS merged key by key)."""
    out = {**_DEFAULTS, **fields}
    for part in _PARTS:
        if part in fields:
            out[part] = {**_DEFAULTS[part], **fields[part]}
    return out


def make_record(**fields: Any) -> Record:
    return Record.from_json(record_json(**fields))


def replace_part(rec: Record, part: str, **changes: Any) -> Record:
    """`rec` with fields of one part changed (records are frozen): replace_part(r, "task", limit=99)."""
    return dataclasses.replace(rec, **{part: dataclasses.replace(getattr(rec, part), **changes)})
