"""Speed per format (qeval.models.speed, run in each arm's evaluation job; qeval.stats.speed judges it).

On the tiny store: a speed record per arm, keyed apart from the accuracy cells (whose keys are the
golden report's and the store tests'), the simulated mark, the report's speed column, landscape and
fastest-within-margin sentence. The dominance mark is checked against a brute-force pairwise count
written independently (numpy broadcasting over every pair)."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pandas as pd

from qeval.cli import main
from qeval.stats.margin import BEYOND, CANNOT_TELL, WITHIN
from qeval.stats.speed import dominated, fastest_within, not_beyond, speed_frame
from qeval.store.record import SIMULATED_SPEED
from qeval.store.store import Store


def _speed(store_path):
    with Store(store_path, readonly=True) as s:
        return list(s.speed_records()), list(s.records())


def test_a_speed_record_per_arm_keyed_apart_from_the_cells(tiny_store):
    store, _ = tiny_store
    speed, records = _speed(store)
    arms = {r.variant.arm for r in records} - {"gguf:q8_0"}  # simulated: float compute, not measured
    assert {r.variant.arm for r in speed} == arms  # every real format and adapter arm, once
    assert len(speed) == len(arms)
    assert not {r.key for r in speed} & {r.key for r in records}
    for r in speed:
        assert r.identity["kind"] == "cpu" and r.identity["cpu"]
        assert r.settings["prompt_tokens"] == 128 and r.settings["new_tokens"] == 16
        assert r.settings["prefill_batch"] == 1  # the tiny suite: analogy at 8, Lee ppl at lm-eval's 1
        assert set(r.decode) == {"1", "8"}
        for d in r.decode.values():
            assert d["steps"] == 15 and d["decode_tok_s"] > 0 and d["ttft_s"] > 0
        assert r.prefill_tok_s > 0 and r.peak_bytes > 0
        # the stored JSON reads back as written (the record kind round-trips)
        assert type(r).from_json(r.to_json()).to_json() == r.to_json()


def test_simulated_formats_are_not_measured(tiny_store):
    """A simulated format computes in float: no speed record (its tokens/s is not the format's);
    the real ones are measured and carry no mark."""
    store, _ = tiny_store
    speed, _ = _speed(store)
    marks = {r.variant.arm: r.mark for r in speed}
    assert "gguf:q8_0" not in marks
    assert marks["none"] == "" and marks["bnb-nf4"] == ""


def test_a_rerun_reuses_cells_and_speed(tiny_store, tmp_path):
    """A store that has speed computes nothing; one without (an older store) gets only speed records,
    and its accuracy cells are reused under the same keys."""
    import shutil
    import sqlite3

    from qeval.run import runner
    from conftest import TINY_STORE_SUITE

    store, model = tiny_store
    copy = tmp_path / "s.sqlite"
    shutil.copy(store, copy)
    with sqlite3.connect(copy) as db:
        db.execute("DROP TABLE speed")  # as a store written before speed records existed
    (tmp_path / "suite.yaml").write_text(TINY_STORE_SUITE)
    plan = runner.plan_from(dict(models=(str(model),), suite=str(tmp_path / "suite.yaml"), device="cpu",
                                 formats=("none", "gguf:q8_0")))
    before = {r.key for r in _speed(store)[1]}
    summary = runner.run_plan(plan, copy, progress=lambda s: None)
    assert summary.computed == [] and set(summary.reused) <= before and len(summary.reused) == 4
    assert len(summary.speed) == 1  # none; gguf:q8_0 is simulated
    again = runner.run_plan(plan, copy, progress=lambda s: None)
    assert again.computed == [] and again.speed == []


def test_arms_with_the_same_kernels_are_measured_once(tiny_store, tmp_path, monkeypatch):
    """LoRA on NF4 runs QLoRA's layers, a merge into the dequantized base is the float model, a
    requantized merge the NF4 one: each shares the measurement of its twin (within the run, or from
    the store), with its own key, the twin's numbers and the mark; arms of other kernels never do."""
    import shutil
    import sqlite3

    from qeval.run import jobs, runner
    from qeval.train.recipe import finetune as real
    from conftest import TINY_STORE_ADAPTERS, TINY_STORE_ARMS, TINY_STORE_SUITE

    monkeypatch.setattr(jobs, "finetune", lambda *a, **k: real(*a, **{**k, "isolate": False}))
    store, model = tiny_store
    copy = tmp_path / "s.sqlite"
    shutil.copy(store, copy)
    with sqlite3.connect(copy) as db:
        db.execute("DROP TABLE speed")  # every speed measured in this run, twins shared within it
    (tmp_path / "suite.yaml").write_text(TINY_STORE_SUITE)
    twins = ({"name": "nf4+lora", "quant": "bnb-nf4", "adapter": "lora"},
             {"name": "qlora-merged-float", "quant": "bnb-nf4", "adapter": "qlora", "merge": "dequantized"})

    def plan(*extra):
        return runner.plan_from(dict(models=(str(model),), suite=str(tmp_path / "suite.yaml"), device="cpu",
                                     formats=("none", "bnb-nf4"), adapters=TINY_STORE_ADAPTERS,
                                     arms=TINY_STORE_ARMS + twins + extra))

    first = runner.run_plan(plan(), copy, progress=lambda s: None)
    assert not first.failed and len(first.speed) == 6
    requant = {"name": "qlora-merged-nf4", "quant": "bnb-nf4", "adapter": "qlora", "merge": "requantized"}
    second = runner.run_plan(plan(requant), copy, progress=lambda s: None)  # its twin is in the store
    assert not second.failed and len(second.speed) == 1
    by_arm = {r.variant.arm: r for r in _speed(copy)[0]}
    assert set(by_arm) == {"none", "bnb-nf4", "lora", "qlora", "nf4+lora", "qlora-merged-float", "qlora-merged-nf4"}
    measured = {a for a, r in by_arm.items() if not r.shared_from}
    assert measured == {"none", "bnb-nf4", "lora", "qlora"}
    assert len({by_arm[a].kernels for a in measured}) == 4  # LoRA on float is not the float model
    for arm, twin in (("nf4+lora", "qlora"), ("qlora-merged-float", "none"), ("qlora-merged-nf4", "bnb-nf4")):
        r, t = by_arm[arm], by_arm[twin]
        assert r.kernels == t.kernels and r.shared_from == t.key and r.shared_arm == twin and r.key != t.key
        assert (r.prefill_tok_s, r.decode, r.peak_bytes) == (t.prefill_tok_s, t.decode, t.peak_bytes)
        assert r.seconds == 0 and r.mark == f"same kernels as {twin}: measured once" and t.mark == ""
        assert r.variant.quant == "bnb-nf4"


def test_dominance_matches_a_pairwise_count():
    rng = random.Random(3)
    for _ in range(50):
        n = rng.randint(1, 7)
        # coarse grids so ties happen
        pts = {f"f{i}": (rng.choice([0.5, 0.7, 0.9, 1.0]), rng.choice([100, 200, 300]), rng.choice([5, 10, 20]))
               for i in range(n)}
        got = dominated(pts)
        names = list(pts)
        a = np.array([pts[k] for k in names], dtype=float)
        a[:, 1] = -a[:, 1]  # all three "higher is better"
        ge = (a[None, :, :] >= a[:, None, :]).all(-1)  # [i, j]: j at least as good as i everywhere
        gt = (a[None, :, :] > a[:, None, :]).any(-1)
        expect = {names[i]: sorted(names[j] for j in range(n) if j != i and ge[i, j] and gt[i, j]) for i in range(n)}
        assert {k: sorted(v) for k, v in got.items()} == {k: v for k, v in expect.items() if v}
    # NaN: not compared
    assert dominated({"a": (1.0, 1, math.nan), "b": (0.5, 2, 1.0)}) == {}


def test_fastest_within_the_margin():
    verdicts = {"a": {"t1": WITHIN, "t2": WITHIN}, "b": {"t1": WITHIN, "t2": CANNOT_TELL},
                "c": {"t1": WITHIN}, "d": {"t1": BEYOND}}
    speeds = {"a": 10.0, "b": 50.0, "c": 12.0, "d": 99.0}
    assert fastest_within(speeds, verdicts) == "c"
    assert fastest_within({"a": 10.0, "b": 50.0}, verdicts) == "a"
    assert fastest_within({"b": 50.0, "d": 1.0}, verdicts) is None
    # the weaker reading: no task shown beyond the margin ('cannot tell' allowed), never an untested one
    assert fastest_within(speeds, verdicts, rule=not_beyond) == "b"
    assert not not_beyond({}) and not not_beyond({"t": BEYOND})
    # every (speed order) permutation picks the fastest of the qualifying ones
    for perm in itertools.permutations([1.0, 2.0, 3.0, 4.0]):
        s = dict(zip("abcd", perm))
        assert fastest_within(s, verdicts) == max(("a", "c"), key=s.get)


def test_report_shows_speed(tiny_store, tmp_path):
    store, _ = tiny_store
    out = tmp_path / "rep"
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    speed, records = _speed(store)
    frame = speed_frame(speed)
    summary = md.split("## Summary")[1].split("\n## ")[0]
    assert "decode tok/s (batch 1)" in summary
    assert f"| gguf:q8_0 |" in summary and SIMULATED_SPEED in summary
    nf4 = frame[frame.arm == "bnb-nf4"].iloc[0]
    assert f"{nf4.decode_tok_s_b1:.3g}" in summary.split("| bnb-nf4 |")[1].split("\n")[0]
    # the sentence: bnb-nf4 is the one real non-baseline format; it qualifies iff every task is within
    res = pd.read_csv(out / "results.csv")
    prim = res[res.primary & res.adapter.isna() & (res.quant == "bnb-nf4")]
    ok = (prim.margin_verdict == WITHIN).all() and len(prim)
    assert ("Fastest format whose loss is within the margin: bnb-nf4" in summary) == bool(ok)
    if not ok:
        assert "Fastest format whose loss is within the margin: no format qualifies" in summary
    assert "## Speed per format" in md and "Accuracy, memory and decode speed together" in md
    assert "not compared (simulated)" in md.split("Accuracy, memory and decode speed together")[1]
    csv = pd.read_csv(out / "speed.csv")
    assert set(csv.arm) == {r.variant.arm for r in records} - {"gguf:q8_0"}


def test_an_old_store_renders_without_speed(tiny_store, tmp_path):
    import shutil
    import sqlite3

    store, _ = tiny_store
    copy = tmp_path / "old.sqlite"
    shutil.copy(store, copy)
    with sqlite3.connect(copy) as db:
        db.execute("DROP TABLE speed")
    out = tmp_path / "rep"
    assert main(["report", "--store", str(copy), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "decode tok/s" not in md and "## Speed per format" not in md and not (out / "speed.csv").exists()
