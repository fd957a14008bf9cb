"""The typed record reads every stored shape and writes it back unchanged: records dumped from a store
written by main at 491cb25 (tests/data/records_v_main.jsonl: a baseline that recorded the divergence
reference, a bitsandbytes format, a torchao one with divergence, a simulated GGUF one, an adapter arm
and a merged arm) round-trip byte for byte, older shapes (keys added since) read with defaults and
write back without them, and keys from a newer qeval survive."""
import json
import sqlite3
from pathlib import Path

import pytest

from qeval.core.files import canonical_json
from qeval.store.record import Record
from qeval.store.store import Store

LINES = (Path(__file__).parent / "data" / "records_v_main.jsonl").read_text().splitlines()


@pytest.mark.unit
@pytest.mark.parametrize("line", LINES, ids=lambda s: json.loads(s)["variant"]["arm"] + "/" + json.loads(s)["task"]["name"])
def test_main_records_round_trip_byte_identically(line):
    rec = Record.from_json(json.loads(line))
    assert canonical_json(rec.to_json()) == line
    assert not rec.extra and not rec.absent  # today's shape: every key known and present


@pytest.mark.unit
def test_readers_see_typed_fields():
    recs = {r.variant.arm: r for r in map(Record.from_json, map(json.loads, LINES))}
    base, merged, lora = recs["none"], recs["qlora-merged-float"], recs["lora"]
    assert base.variant.is_baseline and base.divergence.role == "reference" and not base.divergence.measured
    assert merged.variant.adapter_label == "qlora@merged-float" and not merged.variant.is_baseline
    assert lora.adapter.steps_done == lora.adapter.spec["steps"] and lora.adapter.data["format"] == "text"
    assert recs["torchao:int8-wo"].divergence.measured and recs["gguf:q8_0"].footprint.packed_bytes > 0
    assert all(m.aggregation for r in recs.values() for m in r.metrics.values())


@pytest.mark.unit
def test_older_shapes_read_with_defaults_and_write_back_unchanged():
    d = json.loads(LINES[-1])  # a merged adapter arm: strip what older qevals did not write
    for k in ("compute_dtype", "subtasks", "divergence", "divergence_reference", "divergence_head"):
        d.pop(k)
    for k in ("arm", "merge"):
        d["variant"].pop(k)
    for k in ("idle_bytes", "steps_done", "tokens", "order_hash", "eval_s", "data", "memory"):
        d["adapter"].pop(k)
    for m in d["metrics"].values():
        m.pop("aggregation")
    d["footprint"].pop("packed_bytes"), d["footprint"].pop("packed_types")
    rec = Record.from_json(d)
    assert rec.compute_dtype is None and rec.subtasks == {} and rec.divergence is None
    assert rec.variant.arm == rec.variant.quant and rec.variant.merge == "none" and not rec.stored("divergence_reference")
    assert rec.adapter.steps_done == rec.adapter.spec["steps"] and rec.adapter.idle_bytes == 0
    assert all(m.aggregation is None for m in rec.metrics.values()) and rec.footprint.packed_bytes == 0
    assert canonical_json(rec.to_json()) == canonical_json(d)


@pytest.mark.unit
def test_keys_from_a_newer_qeval_survive(tmp_path):
    d = json.loads(LINES[0])
    d["from_the_future"] = {"x": [1, 2]}
    d["variant"]["new_axis"] = "y"
    d["metrics"]["word_perplexity"]["ci"] = [1.0, 2.0]
    rec = Record.from_json(d)
    assert rec.extra == {"from_the_future": {"x": [1, 2]}} and rec.variant.extra == {"new_axis": "y"}
    with Store(tmp_path / "s.sqlite") as s:
        assert s.put(rec)
        assert canonical_json(s.get(rec.key).to_json()) == canonical_json(d)
        assert list(s.records()) == [rec]


@pytest.mark.unit
def test_a_record_missing_a_key_every_qeval_wrote_is_refused():
    from qeval.core.errors import QevalError

    d = json.loads(LINES[0])
    del d["task"]["name"]
    with pytest.raises(QevalError, match="'name'"):
        Record.from_json(d)


def test_store_of_main_records_renders_frames(tmp_path):
    """The frames the report reads, from records stored and read back (no model)."""
    pd = pytest.importorskip("pandas")
    from qeval.stats.compare import divergence_frame, memory_frame, results_frame

    with Store(tmp_path / "s.sqlite") as s:
        for line in LINES:
            s.put(Record.from_json(json.loads(line)))
        recs = list(s.records())
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        stored = [r for (r,) in db.execute("SELECT record FROM records")]
    assert sorted(stored) == sorted(LINES)  # the store holds exactly main's text
    res = results_frame(recs)
    assert set(res["quant"]) >= {"none", "bnb-int8", "gguf:q8_0"} and isinstance(res, pd.DataFrame)
    assert not memory_frame(recs).empty
    assert list(divergence_frame(recs, pd.DataFrame())["quant"]) == ["torchao:int8-wo"]
