"""Nightly gates on a synthetic store (no model): one verdict everywhere, no false alarm from
perplexity jitter, persistent regressions and acks, every threshold applied with direction, exit codes."""
import hashlib
import json
import math

import pytest

from qeval.stats.compare import adapter_frames, divergence_frame, paired_frame, results_frame, with_paired
from qeval.gates.nightly import Thresholds, acknowledge, gate_run
from qeval.store.store import Store
from tests.records import make_record
from tests.test_paired import loglik, mcnemar_p, right_wrong, score_p

_clock = [0]


def record(arm, task, samples, primary, *, quant=None, adapter="", hib=True, version="1", divergence=None):
    """A stored record of `arm` on `task` whose metrics aggregate `samples` like lm-eval does."""
    metrics = {}
    for metric in samples[0]:
        if metric in ("doc_id", "doc_hash"):
            continue
        vals = [s[metric] for s in samples]
        if isinstance(vals[0], list):
            W = sum(v[1] for v in vals)
            x = -sum(v[0] for v in vals) / W
            value = x / math.log(2) if metric == "bits_per_byte" else math.exp(x)
            metric_hib = False
        else:
            value, metric_hib = sum(vals) / len(vals), hib
        metrics[metric] = {"value": value, "stderr": None, "higher_is_better": metric_hib}
    quant = quant or arm
    _clock[0] += 1
    key = hashlib.sha256(json.dumps([arm, task, samples, version]).encode()).hexdigest()
    spec = {"method": "lora", "train_quant": quant, "train_data": "lee_background", "steps": 2,
            "domain_tasks": ["qeval_lee_ppl"]}
    return make_record(**{"key": key, "variant_id": f"m|{arm}", "created_at": f"2026-01-01T00:00:{_clock[0]:06d}",
            "variant": {"model": "m", "quant": quant, "adapter": adapter, "merge": "none", "arm": arm},
            "model": {"fingerprint": "f"}, "task": {"name": task, "fingerprint": "t", "limit": len(samples),
                                                   "num_fewshot": 0},
            "metrics": metrics, "primary_metric": primary, "n": len(samples), "versions": {"bitsandbytes": version},
            "device": "cpu", "seed": 1, "divergence": divergence, "timings": {"load_s": 1, "eval_s": 1},
            "peak_bytes": 1,
            "footprint": {"total_bytes": 1, "quantized_weight_bytes": 0, "quant_state_bytes": 0, "unquantized_bytes": 1,
                          "theory_bytes": 1, "quantized_params": 0},
            "adapter": None if not adapter else {"spec": spec, "trainable_params": 5, "total_params": 50,
                                                 "adapter_bytes": 9, "train_s": 3, "s_per_step": 1.5,
                                                 "tokens_per_s": 10, "peak_train_bytes": 7, "idle_bytes": 1,
                                                 "losses": [[1, 2.0]], "heldout": [[0, 2.5]], "key": "k",
                                                 "device": "cpu"}})


def night(store, cells, th=Thresholds()):
    """One nightly run over `cells` [(record, samples)]: store them, gate, finish the run."""
    keys = []
    for rec, samples in cells:
        store.put(rec, samples)
        keys.append(rec.key)
    info = {"cells": keys, "versions": {"bitsandbytes": "1"}, "failed": []}
    run_id = store.start_run("nightly", info)
    gated, status = gate_run(store, run_id, keys, th, "nightly", info)
    return gated, status


def regressions(gated):
    return [f for f in gated.findings if f.kind == "regression"]


def test_one_verdict_for_one_pair_in_every_table_and_the_nightly(tmp_path):
    """Similarity 0.685 -> 0.650 with 10 right->wrong, 3 wrong->right of 200: score test p = 0.061
    (McNemar's exact p = 0.092, the divergence table's extra column)."""
    base_s, int8_s = right_wrong(200, rw=10, wr=3, right=137)
    base = record("none", "qeval_similarity", base_s, "acc")
    int8 = record("bnb-int8", "qeval_similarity", int8_s, "acc",
                  divergence={"kl_mean": 0.01, "kl_p90": 0.02, "kl_p99": 0.05, "kl_max": 0.1, "top1_agree": 0.98,
                              "ppl_ratio": 1.01, "tokens": 1000, "seconds": 1.0})
    arm = record("int8+lora", "qeval_similarity", int8_s, "acc", quant="bnb-int8", adapter="lora")
    samples = {r.key: s for r, s in ((base, base_s), (int8, int8_s), (arm, int8_s))}
    records = [base, int8, arm]
    expected = score_p(10, 3)

    pairs = paired_frame(records, samples.get)
    row = pairs[(pairs.quant == "bnb-int8") & (pairs.adapter == "")].iloc[0]
    assert row.p_value == pytest.approx(expected) and row.verdict == "within noise"
    table = with_paired(results_frame(records), pairs)
    assert table[(table.quant == "bnb-int8") & (table.adapter == "")].verdict.item() == "within noise"

    div = divergence_frame(records, pairs)
    d = div[(div.quant == "bnb-int8") & (div.adapter == "")].iloc[0]
    assert d.mcnemar_p == pytest.approx(mcnemar_p(10, 3)) and d.verdict == "within noise"

    frames = adapter_frames(records, samples.get)
    reg = frames["regained"].iloc[0]
    assert reg.lost_p == pytest.approx(expected) and reg.lost_verdict == "within noise" and not reg.lost_significant

    # and the rendered tables say it in words
    from qeval.stats.compare import memory_frame
    from qeval.report.build import render

    memory = memory_frame(records)
    render(table, memory, {}, tmp_path / "report", div=div, adapters=frames)
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    accuracy = next(line for line in md.splitlines() if line.startswith("| bnb-int8 | 0.6500"))
    assert "(within noise)" in accuracy and " *" not in accuracy
    # the flips table (after the llama.cpp-style KL table, whose rows start alike)
    divergence = [line for line in md.splitlines() if line.startswith("| bnb-int8 | 1000 |")][-1]
    assert divergence.endswith("| within noise |")
    adapter = next(line for line in md.splitlines() if line.startswith("| int8+lora |"))
    assert "(within noise)" in adapter and "nothing to regain (loss within noise)" in adapter

    with Store(tmp_path / "s.sqlite") as store:
        night(store, [(base, base_s)])
        tonight = record("none", "qeval_similarity", int8_s, "acc", version="2")  # same cell, the int8 outputs
        gated, status = night(store, [(tonight, int8_s)])
    assert status == "ok" and gated.tests == 1 and not regressions(gated)

    # and with 12 / 1 all four say "worse" together
    base_s, bad_s = right_wrong(200, rw=12, wr=1, right=137)
    assert score_p(12, 1) < 0.05
    with Store(tmp_path / "t.sqlite") as store:
        night(store, [(record("none", "qeval_similarity", base_s, "acc"), base_s)])
        gated, status = night(store, [(record("none", "qeval_similarity", bad_s, "acc", version="2"), bad_s)])
    assert status == "regression" and "Tango score test" in regressions(gated)[0].detail
    bad = record("bnb-int8", "qeval_similarity", bad_s, "acc")
    b0 = record("none", "qeval_similarity", base_s, "acc")
    pairs = paired_frame([b0, bad], {b0.key: base_s, bad.key: bad_s}.get)
    assert pairs.verdict.item() == "worse"


def ppl_samples(scale=1.0, seed=0):
    out = loglik(seed=seed, metric="word_perplexity")
    return [{"doc_id": s["doc_id"], "doc_hash": s["doc_hash"],
             "word_perplexity": [s["word_perplexity"][0] * scale, s["word_perplexity"][1]],
             "bits_per_byte": [s["word_perplexity"][0] * scale, s["word_perplexity"][1] * 5]} for s in out]


def test_perplexity_scaled_by_1_00001_is_not_a_regression(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        night(store, [(record("none", "ppl", ppl_samples(), "word_perplexity"), ppl_samples())])
        s = ppl_samples(1.00001)
        gated, status = night(store, [(record("none", "ppl", s, "word_perplexity", version="2"), s)])
        assert status == "ok" and not regressions(gated) and gated.tests == 2  # both metrics compared
        s = ppl_samples(1.03)  # a 3%-scale rise of every log-likelihood: ~15% perplexity
        gated, status = night(store, [(record("none", "ppl", s, "word_perplexity", version="3"), s)])
    assert status == "regression" and {f.metric for f in regressions(gated)} == {"word_perplexity", "bits_per_byte"}
    assert "Benjamini-Hochberg" in regressions(gated)[0].detail


def test_regression_stays_open_until_acknowledged(tmp_path):
    good, bad = right_wrong(300, rw=0, wr=0, right=200)[0], right_wrong(300, rw=40, wr=0, right=200)[1]
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        night(store, [(record("bnb-nf4", "qeval_analogy", good, "acc"), good)])
        broken = record("bnb-nf4", "qeval_analogy", bad, "acc", version="2")
        gated, status = night(store, [(broken, bad)])
        assert status == "regression" and len(regressions(gated)) == 1
        gated, status = night(store, [(broken, bad)])  # an unchanged night reuses the cell
        assert status == "regression" and "open since run 2" in regressions(gated)[0].detail
    with pytest.raises(Exception, match="did you mean"):
        acknowledge(path, "bnb-nf4 / qeval_analogi", "known")
    assert acknowledge(path, "bnb-nf4 / qeval_analogy", "nf4 lost analogies in bnb 2; accepted") == [
        regressions(gated)[0].id]
    with Store(path) as store:
        gated, status = night(store, [(broken, bad)])
        assert status == "ok" and not regressions(gated)
        assert [f.kind for f in gated.findings] == ["acknowledged"] and "accepted" in gated.findings[0].detail
        assert [r["kind"] for r in store.runs()].count("ack") == 1  # in the store's history


def test_regression_closes_when_a_later_run_fixes_it(tmp_path):
    good, bad = right_wrong(300, rw=0, wr=0, right=200)[0], right_wrong(300, rw=40, wr=0, right=200)[1]
    with Store(tmp_path / "s.sqlite") as store:
        night(store, [(record("bnb-nf4", "qeval_analogy", good, "acc"), good)])
        night(store, [(record("bnb-nf4", "qeval_analogy", bad, "acc", version="2"), bad)])
        # the next release is slightly better than the broken one but still worse than before: open
        half = right_wrong(300, rw=30, wr=0, right=200)[1]
        gated, status = night(store, [(record("bnb-nf4", "qeval_analogy", half, "acc", version="3"), half)])
        assert status == "regression"
        gated, status = night(store, [(record("bnb-nf4", "qeval_analogy", good, "acc", version="4"), good)])
        assert status == "ok" and not regressions(gated)
        gated, status = night(store, [(record("bnb-nf4", "qeval_analogy", good, "acc", version="4"), good)])
        assert status == "ok"


def test_plan_acknowledgement_without_the_model_name(tmp_path):
    good, bad = right_wrong(300, rw=0, wr=0, right=200)[0], right_wrong(300, rw=40, wr=0, right=200)[1]
    th = Thresholds(acknowledged=({"cell": "bnb-nf4 / qeval_analogy", "reason": "known"},))
    with Store(tmp_path / "s.sqlite") as store:
        night(store, [(record("bnb-nf4", "qeval_analogy", good, "acc"), good)], th)
        gated, status = night(store, [(record("bnb-nf4", "qeval_analogy", bad, "acc", version="2"), bad)], th)
    assert status == "ok" and [f.kind for f in gated.findings] == ["acknowledged"]


def test_collapse_to_zero_fails_the_per_arm_gate_and_zero_baseline_is_undefined(tmp_path):
    n = 60
    base_s = [{"doc_id": i, "doc_hash": str(i), "exact_match": float(i < 34)} for i in range(n)]  # 0.567
    zero_s = [{**s, "exact_match": 0.0} for s in base_s]
    th = Thresholds(min_recovery=0.85, per_arm={"bnb-nf4": 0.40})
    with Store(tmp_path / "s.sqlite") as store:
        gated, status = night(store, [(record("none", "qeval_capitals", base_s, "exact_match"), base_s),
                                      (record("bnb-nf4", "qeval_capitals", zero_s, "exact_match"), zero_s)], th)
    assert status == "regression"
    assert "recovery 0.000 < threshold 0.400" in regressions(gated)[0].detail
    with Store(tmp_path / "t.sqlite") as store:
        gated, status = night(store, [(record("none", "qeval_capitals", zero_s, "exact_match"), zero_s),
                                      (record("bnb-nf4", "qeval_capitals", base_s, "exact_match"), base_s)], th)
    assert status == "regression" and "undefined (baseline 0)" in regressions(gated)[0].detail


def test_per_metric_and_warn_below_apply_to_non_primary_metrics_with_direction(tmp_path):
    base_s, worse_s = ppl_samples(), ppl_samples(1.2)
    base = record("none", "qeval_lee_ppl", base_s, "word_perplexity")
    nf4 = record("bnb-nf4", "qeval_lee_ppl", worse_s, "word_perplexity")
    bpb = nf4.metrics["bits_per_byte"].value
    th = Thresholds(per_metric={"bits_per_byte": 0.9},  # bits per byte is not the primary metric
                    warn_below={"qeval_lee_ppl:bits_per_byte": bpb - 0.01})  # lower is better: above warns
    with Store(tmp_path / "s.sqlite") as store:
        gated, status = night(store, [(base, base_s), (nf4, worse_s)], th)
    gates = {(f.kind, f.metric) for f in gated.findings}
    assert ("regression", "bits_per_byte") in gates and ("warning", "bits_per_byte") in gates
    assert ("regression", "word_perplexity") not in gates  # no gate names the primary metric here
    assert status == "regression"
    th = Thresholds(warn_below={"qeval_lee_ppl:bits_per_byte": bpb + 0.01})  # better than the level: quiet
    with Store(tmp_path / "t.sqlite") as store:
        gated, status = night(store, [(base, base_s), (nf4, worse_s)], th)
    assert status == "ok" and not gated.findings


def test_float_base_arm_shows_its_gain_against_the_baseline():
    base_s = ppl_samples()
    gain_s = ppl_samples(0.97)  # the fine-tune lowers every document's loss by 3%
    base = record("none", "qeval_lee_ppl", base_s, "word_perplexity")
    lora = record("lora", "qeval_lee_ppl", gain_s, "word_perplexity", quant="none", adapter="lora")
    samples = {base.key: base_s, lora.key: gain_s}
    reg = adapter_frames([base, lora], samples.get)["regained"].iloc[0]
    assert reg.float_base and reg.lost_verdict == "within noise"  # nothing lost, nothing to regain
    assert reg.vs_baseline_verdict == "better"  # but its gain is shown, not "within noise"
    from qeval.report.doc import to_markdown
    from qeval.report.sections.adapters import adapter_section
    import pandas as pd

    md = to_markdown(adapter_section({"regained": pd.DataFrame([reg]), "merge": pd.DataFrame(),
                                      "training": pd.DataFrame()}, pd.DataFrame(), "", pd.DataFrame()).blocks)
    assert "trained on the float base: better vs baseline" in md


def test_bench_gates_runs_on_a_small_store(tmp_path):
    from qeval.gates.bench_gates import run

    base_s, int8_s = right_wrong(300, rw=6, wr=5, right=200)
    cells = [(record("none", "qeval_analogy", base_s, "acc"), base_s),
             (record("bnb-int8", "qeval_analogy", int8_s, "acc"), int8_s),
             (record("none", "qeval_lee_ppl", ppl_samples(), "word_perplexity"), ppl_samples()),
             (record("bnb-int8", "qeval_lee_ppl", ppl_samples(1.01, seed=0), "word_perplexity"), ppl_samples(1.01))]
    with Store(tmp_path / "s.sqlite") as store:
        for rec, s in cells:
            store.put(rec, s)
    text = run(tmp_path / "s.sqlite", tmp_path / "out", nights=30, detect_nights=20)
    assert "false alarm per no-change night" in text and "qeval_analogy acc: drop of " in text and "nightly MDE at 90% power" in text
    assert "a 3% rise" in text and (tmp_path / "out" / "gates.md").read_text() == text


def test_a_candidate_run_is_compared_with_the_last_locked_run(tmp_path):
    good, bad = right_wrong(300, rw=0, wr=0, right=200)[0], right_wrong(300, rw=40, wr=0, right=200)[1]
    with Store(tmp_path / "s.sqlite") as store:
        night(store, [(record("bnb-nf4", "qeval_analogy", good, "acc"), good)])
        cand = record("bnb-nf4", "qeval_analogy", bad, "acc", version="candidate")
        store.put(cand, bad)
        info = {"cells": [cand.key], "versions": {"bitsandbytes": "candidate"}, "failed": []}
        run_id = store.start_run("candidate", info)
        gated, status = gate_run(store, run_id, [cand.key], Thresholds(), "nightly", info)
        assert status == "regression" and store.runs("candidate")[0]["status"] == "regression"
        assert [r["status"] for r in store.runs("nightly")] == ["ok"]  # the locked history is untouched


def test_per_arm_gate_applies_to_the_seeded_arms_of_that_name(tmp_path):
    """`seeds: [1, 2]` runs arm `qlora` as `qlora#s1`, `qlora#s2`: the plan's per_arm gate for
    `qlora` is theirs (0.40 passes a 0.59 recovery that min_recovery 0.85 would fail)."""
    n = 60
    base_s = [{"doc_id": i, "doc_hash": str(i), "exact_match": float(i < 34)} for i in range(n)]  # 34 right
    half_s = [{**s, "exact_match": float(i < 20)} for i, s in enumerate(base_s)]  # 20 right: recovery 0.588
    th = Thresholds(min_recovery=0.85, per_arm={"qlora": 0.40})
    for arm in ("qlora#s1", "qlora#s2"):
        assert th.limit(arm, "exact_match", True) == 0.40
    assert th.limit("lora#s1", "exact_match", True) == 0.85 and th.limit("qlora", "exact_match", True) == 0.40
    assert Thresholds(per_arm={"qlora": 0.4, "qlora#s2": 0.7}).limit("qlora#s2", "acc", True) == 0.7  # exact name first
    cells = [(record("none", "qeval_capitals", base_s, "exact_match"), base_s)]
    cells += [(record(a, "qeval_capitals", half_s, "exact_match", quant="bnb-nf4-dq", adapter=a), half_s) for a in ("qlora#s1", "qlora#s2")]
    with Store(tmp_path / "s.sqlite") as store:
        gated, status = night(store, cells, th)
    assert status == "ok" and not regressions(gated)
    with Store(tmp_path / "t.sqlite") as store:  # without the per_arm entry min_recovery gates both seeds
        gated, status = night(store, cells, Thresholds(min_recovery=0.85))
    regs = regressions(gated)
    assert status == "regression" and len(regs) == 2 and all("qlora#s" in f.cell for f in regs)


def test_per_arm_names_a_seeded_arm_by_its_plan_name_in_validation():
    from types import SimpleNamespace

    from qeval.core.errors import QevalError
    from qeval.gates.nightly import thresholds_of

    rp = SimpleNamespace(arms=[SimpleNamespace(name=n) for n in ("none", "qlora#s1", "qlora#s2")],
                         suite=SimpleNamespace(tasks=[]))
    ok = thresholds_of(SimpleNamespace(thresholds=Thresholds(per_arm={"qlora": 0.4})), rp)
    assert ok.per_arm == {"qlora": 0.4}
    with pytest.raises(QevalError) as e:
        thresholds_of(SimpleNamespace(thresholds=Thresholds(per_arm={"qlor": 0.4})), rp)
    assert "'qlora'" in str(e.value)  # did you mean the plan's name
