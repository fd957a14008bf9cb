"""Comparison frames from records: recovery orientation, regained share, 'within noise'."""
import json
import math

import pytest

from qeval.stats.compare import adapter_frames, memory_frame, results_frame
from tests.records import make_record, replace_part


def _rec(*args, **kw):
    return make_record(**_rec_json(*args, **kw))


def _rec_json(quant, task, metric, value, stderr, hib=True, adapter="", merge="none", arm=None, created="2026-01-01"):
    fp = {"total_bytes": 100 if quant == "none" else 40, "quantized_weight_bytes": 0 if quant == "none" else 20,
          "quant_state_bytes": 0 if quant == "none" else 2, "unquantized_bytes": 100 if quant == "none" else 18,
          "theory_bytes": 100 if quant == "none" else 39, "quantized_params": 0 if quant == "none" else 40, "census": {}}
    spec = {"method": "lora", "train_quant": quant, "train_data": "lee_background", "steps": 2,
            "domain_tasks": ["qeval_lee_ppl"]}
    return {"key": f"{quant}{adapter}{merge}{task}{created}", "variant": {"model": "m", "quant": quant, "adapter": adapter,
            "merge": merge, "arm": arm or (quant if not adapter else f"{quant}+{adapter}")},
            "model": {"fingerprint": "f"}, "task": {"name": task, "fingerprint": "t", "limit": 10, "num_fewshot": 0},
            "metrics": {metric: {"value": value, "stderr": stderr, "higher_is_better": hib}}, "primary_metric": metric,
            "n": 10, "footprint": fp, "device": "cpu", "created_at": created, "timings": {"load_s": 1, "eval_s": 2},
            "peak_bytes": 5,
            "adapter": None if not adapter else {"spec": spec, "trainable_params": 5, "total_params": 50,
                                                  "adapter_bytes": 9, "train_s": 3, "s_per_step": 1.5,
                                                  "tokens_per_s": 10, "peak_train_bytes": 7, "idle_bytes": 1,
                                                  "losses": [[1, 2.0]], "heldout": [[0, 2.5]], "key": "k", "device": "cpu"}}


def test_recovery_is_oriented_for_both_kinds_of_metric():
    recs = [_rec("none", "mc", "acc", 0.8, 0.02), _rec("bnb-nf4", "mc", "acc", 0.6, 0.02),
            _rec("none", "ppl", "word_perplexity", 100, 5, hib=False),
            _rec("bnb-nf4", "ppl", "word_perplexity", 125, 5, hib=False)]
    res = results_frame(recs).set_index(["quant", "task"])
    assert res.loc[("bnb-nf4", "mc"), "recovery"] == pytest.approx(0.75)
    assert res.loc[("bnb-nf4", "ppl"), "recovery"] == pytest.approx(0.8)  # baseline / value
    assert res.loc[("bnb-nf4", "ppl"), "ratio"] == pytest.approx(1.25)
    assert res.loc[("bnb-nf4", "mc"), "delta"] == pytest.approx(-0.2)


def test_newest_record_wins_and_other_limits_do_not_mix():
    recs = [_rec("none", "mc", "acc", 0.8, 0.02), _rec("bnb-nf4", "mc", "acc", 0.5, 0.02, created="2026-01-01"),
            _rec("bnb-nf4", "mc", "acc", 0.6, 0.02, created="2026-02-01")]
    other = _rec("bnb-int8", "mc", "acc", 0.7, 0.02)
    other = replace_part(other, "task", limit=99)  # measured on other documents: no baseline to compare with
    res = results_frame(recs + [other]).set_index("quant")
    assert res.loc["bnb-nf4", "value"] == 0.6
    assert math.isnan(res.loc["bnb-int8", "baseline_value"])


def _samples(metric, value, n=200, seed=0):
    """Per-document samples whose aggregate is `value`: 0/1 for accuracy (the first value*n right),
    (loglikelihood, count) pairs for a perplexity, with per-document noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if metric == "acc":
        k = round(value * n)
        return [{"doc_id": i, "doc_hash": str(i), "acc": float(i < k)} for i in range(n)]
    w = np.full(n, 100.0)
    nll = np.log(value) * w * (1 + rng.normal(0, 0.01, n))
    nll *= np.log(value) * w.sum() / nll.sum()  # exactly `value` in aggregate
    return [{"doc_id": i, "doc_hash": str(i), metric: [-float(nll[i]), 100.0]} for i in range(n)]


def test_regained_share_and_noise():
    recs = [_rec("none", "qeval_lee_ppl", "word_perplexity", 100, 2, hib=False),
            _rec("bnb-nf4", "qeval_lee_ppl", "word_perplexity", 140, 2, hib=False),
            _rec("bnb-nf4", "qeval_lee_ppl", "word_perplexity", 110, 2, hib=False, adapter="qlora"),
            _rec("none", "qeval_analogy", "acc", 0.80, 0.05), _rec("bnb-nf4", "qeval_analogy", "acc", 0.78, 0.05),
            _rec("bnb-nf4", "qeval_analogy", "acc", 0.79, 0.05, adapter="qlora")]
    samples = {r.key: _samples(r.primary_metric, r.metrics[r.primary_metric].value) for r in recs}
    reg = adapter_frames(recs, samples.get)["regained"].set_index("task")
    assert reg.loc["qeval_lee_ppl", "lost_significant"]
    assert reg.loc["qeval_lee_ppl", "regained"] == pytest.approx(0.75)  # (140 - 110) / (140 - 100)
    assert not reg.loc["qeval_analogy", "lost_significant"] and math.isnan(reg.loc["qeval_analogy", "regained"])  # within noise
    assert reg.loc["qeval_analogy", "untouched"] and not reg.loc["qeval_lee_ppl", "untouched"]


def test_memory_frame_ratios():
    mem = memory_frame([_rec("none", "mc", "acc", 0.8, 0.02), _rec("bnb-nf4", "mc", "acc", 0.6, 0.02)]).set_index("quant")
    assert mem.loc["bnb-nf4", "ratio_to_baseline"] == pytest.approx(0.4)
    assert mem.loc["bnb-nf4", "ratio_to_theory"] == pytest.approx(40 / 39)
    assert mem.loc["bnb-nf4", "measured_bits_per_weight"] == pytest.approx(22 * 8 / 40)


def _seeded(quant, adapter, seed, value, peak, order="o", options=None):
    r = _rec_json(quant, "qeval_lee_ppl", "word_perplexity", value, 2, hib=False, adapter=f"{adapter}#s{seed}",
             arm=f"{adapter}#s{seed}")
    r["adapter"] = {**r["adapter"], "spec": {**r["adapter"]["spec"], "seed": seed}, "peak_train_bytes": peak,
                    "order_hash": f"{order}{seed}", "tokens": 100,
                    "memory": {"load_peak": 2 * peak, "train_peak": peak, "weights": peak // 2, "adapter_optimizer": 1,
                               "gradients": 1, "activations": peak // 2 - 2, "predicted": {"total": peak},
                               "prediction_error": 0.0, **({"options": options} if options else {})}}
    return make_record(**r)


def test_seeds_spread_and_no_clear_winner(tmp_path):
    from scipy import stats

    from qeval.stats.compare import decision

    base = [_rec("none", "qeval_lee_ppl", "word_perplexity", 120, 2, hib=False),
            _rec("bnb-nf4", "qeval_lee_ppl", "word_perplexity", 140, 2, hib=False),
            _rec("none", "qeval_analogy", "acc", 0.8, 0.02)]  # an untouched task: the ppl one is the domain
    lora = [_seeded("none", "lora", s, v, 2000) for s, v in ((1, 100), (2, 104), (3, 96))]
    close = [_seeded("bnb-nf4", "qlora", s, v, 1000) for s, v in ((1, 101), (2, 99), (3, 103))]
    recs = base + lora + close
    samples = {r.key: _samples(r.primary_metric, r.metrics[r.primary_metric].value) for r in recs}
    frames = adapter_frames(recs, samples.get)
    seeds = frames["seeds"].set_index("arm")
    lo, hi = stats.t.interval(0.95, 2, loc=100, scale=stats.sem([100, 104, 96]))
    assert seeds.loc["lora", "seeds"] == 3 and seeds.loc["lora", "value_mean"] == pytest.approx(100)
    assert (seeds.loc["lora", "value_lo"], seeds.loc["lora", "value_hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert seeds.loc["qlora", "regained_min"] == pytest.approx((140 - 103) / 20)  # the worst seed regains least
    table, verdict = decision(frames, None)
    assert len(table) == 6 and "No clear winner on qeval_lee_ppl" in verdict and "least training memory: qlora" in verdict
    from qeval.report.sections.adapters import adapter_section

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                                                      "num_hidden_layers": 30, "num_attention_heads": 9}))
    recs = [replace_part(r, "model", path=str(tmp_path)) for r in recs]
    section = adapter_section(adapter_frames(recs, samples.get), table, verdict, memory_frame(recs))
    assert any("Projected to GPUs" in str(b) for b in section.blocks)
    assert "adapter_seeds.csv" in section.files and any("spread across seeds" in str(b) for b in section.blocks)
    assert any("measured and predicted" in str(b) for b in section.blocks)
    far = [_seeded("bnb-nf4", "qlora", s, v, 1000) for s, v in ((1, 131), (2, 130), (3, 129))]
    table, verdict = decision(adapter_frames(base + lora + far), None)
    assert "No clear winner" not in verdict and verdict.startswith("Best on qeval_lee_ppl: lora (word_perplexity 100")
    single = decision(adapter_frames(base + lora[:1] + far[:1]), None)[1]
    assert "training noise is not measured" in single
    unfair = decision(adapter_frames(base + lora[:1] + [_seeded("bnb-nf4", "qlora", 1, 130, 1000, order="x")]), None)[1]
    assert "Not like for like" in unfair


def test_least_training_memory_says_no_clear_winner_when_seed_peaks_overlap():
    """Memory goes through the same rule as scores (qeval.stats.paired.seeds_differ): two arms whose peaks
    over seeds do not differ beyond their noise have no memory winner; clearly apart, the cheaper wins."""
    from scipy import stats

    from qeval.stats.compare import decision
    from qeval.stats.paired import seeds_differ

    base = [_rec("none", "qeval_lee_ppl", "word_perplexity", 120, 2, hib=False),
            _rec("bnb-nf4", "qeval_lee_ppl", "word_perplexity", 140, 2, hib=False),
            _rec("none", "qeval_analogy", "acc", 0.8, 0.02)]
    a_peaks, b_peaks = (1000, 1040, 1010), (1030, 990, 1020)  # 3 MiB-ish apart in the mean, 40 MiB of noise
    assert stats.ttest_ind(a_peaks, b_peaks, equal_var=False).pvalue > 0.05 and seeds_differ(a_peaks, b_peaks) is False
    a = [_seeded("none", "lora", s, 100 + s, p) for s, p in zip((1, 2, 3), a_peaks)]
    b = [_seeded("bnb-nf4", "qlora", s, 110 + s, p) for s, p in zip((1, 2, 3), b_peaks)]
    verdict = decision(adapter_frames(base + a + b), None)[1]
    assert "no clear winner on memory: lora and qlora do not differ" in verdict
    # a tie is named in a stable order (by arm name), whichever measured a few MiB lower
    assert "least training memory: lora (" in verdict
    b_lower = [_seeded("bnb-nf4", "qlora", s, 110 + s, p - 20) for s, p in zip((1, 2, 3), b_peaks)]
    again = decision(adapter_frames(base + a + b_lower), None)[1]
    assert seeds_differ(a_peaks, [p - 20 for p in b_peaks]) is False
    assert "least training memory: lora (" in again and "lora and qlora do not differ" in again
    b_far = [_seeded("bnb-nf4", "qlora", s, 110 + s, p - 400) for s, p in zip((1, 2, 3), b_peaks)]
    verdict = decision(adapter_frames(base + a + b_far), None)[1]
    assert "least training memory: qlora" in verdict and "no clear winner on memory" not in verdict
    # two seeds, the cold runs' numbers (MiB): 330 apart with ~30 of noise is a winner in both runs,
    # though the two 95% t intervals (mean +- 12.7 sd / sqrt 2) of the second run overlap
    assert seeds_differ([1539, 1544], [1197, 1174]) and seeds_differ([1531, 1490], [1197, 1174])


def test_the_memory_verdict_names_the_trainer_options_and_flags_a_mix():
    """The LoRA-vs-QLoRA memory verdict says which checkpointing / cross-entropy setting its peaks were
    measured with, and calls a comparison of arms measured with different settings unfair."""
    from qeval.stats.compare import decision

    base = [_rec("none", "qeval_lee_ppl", "word_perplexity", 120, 2, hib=False),
            _rec("bnb-nf4", "qeval_lee_ppl", "word_perplexity", 140, 2, hib=False),
            _rec("none", "qeval_analogy", "acc", 0.8, 0.02)]
    off, on = "checkpointing none, cross-entropy full", "checkpointing layer (auto), cross-entropy full"
    same = decision(adapter_frames(base + [_seeded("none", "lora", 1, 100, 2000, options=off),
                                           _seeded("bnb-nf4", "qlora", 1, 101, 1000, options=off)]), None)[1]
    assert f"Training memory measured with {off} for every arm." in same and "on memory" not in same
    mixed = decision(adapter_frames(base + [_seeded("none", "lora", 1, 100, 2000, options=on),
                                            _seeded("bnb-nf4", "qlora", 1, 101, 1000, options=off)]), None)[1]
    assert f"Not like for like on memory: the arms trained with different memory options (lora#s1: {on}; qlora#s1: {off})" in mixed
    old = decision(adapter_frames(base + [_seeded("none", "lora", 1, 100, 2000), _seeded("bnb-nf4", "qlora", 1, 101, 1000)]), None)[1]
    assert "memory options" not in old and "Training memory measured" not in old


def test_seeds_differ_is_welch_and_says_when_noise_is_not_measured():
    from scipy import stats

    from qeval.stats.paired import seeds_differ

    a, b = [100.0, 104.0, 96.0], [110.0, 113.0, 108.0]
    assert seeds_differ(a, b) == (stats.ttest_ind(a, b, equal_var=False).pvalue < 0.05)
    assert seeds_differ([1.0], [2.0, 3.0]) is None and seeds_differ([1.0, 1.0], [1.0, 1.0]) is False
    assert seeds_differ([1.0, 1.0], [2.0, 2.0]) is True
