"""KL / top-1 agreement: exact against both models' own logits, zero noise floor, paired statistics."""
import math
import json
from pathlib import Path

import numpy as np
import pytest

from qeval.stats.paired import compare_pair
from qeval.eval.divergence import Capture, Reference, exact_kl, summarize
from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS
from qeval.eval.suites import DATA_DIR


@pytest.fixture(scope="module")
def docs(tiny_model_dir):
    tok = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("none"), "cpu").tokenizer
    texts = [json.loads(x)["text"] for x in (DATA_DIR / "lee_news.jsonl").read_text().splitlines()[:3]]
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids for t in texts]


def _run(model, docs, reference=None):
    import torch

    with Capture(model, reference) as cap, torch.no_grad():
        for ids in docs:
            model(torch.tensor([ids]))
    return cap


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """The tiny model with larger weights: its next-token distributions are peaked like a trained
    LM's (the default init gives near-uniform ones, where every KL is ~1e-7)."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("peaked"), init_range=0.5)


def test_reference_kl_equals_exact_full_vocabulary_kl(peaked_model_dir, docs, tmp_path):
    r = resolve_model(str(peaked_model_dir))
    base = load_model(r, FORMATS.get("none"), "cpu").model
    ref = _run(base, docs).reference()
    ref.save(tmp_path / "ref.safetensors")
    ref = Reference.load(tmp_path / "ref.safetensors")  # through the stored form
    for fmt in ("bnb-nf4", "bnb-int8"):
        variant = load_model(r, FORMATS.get(fmt), "cpu").model
        got = _run(variant, docs, ref).result()
        exact = exact_kl(base, variant, docs, "cpu")
        assert got.tokens == exact.size == sum(len(d) - 1 for d in docs)
        assert got.kl_mean > 1e-3
        assert abs(got.kl_mean - exact.mean()) / exact.mean() < 1e-3  # well under the 1% asked for
        assert got.kl_p99 == pytest.approx(np.percentile(exact, 99), rel=1e-2)
        assert 0 < got.top1_agree <= 1
        _check_llama_stats(got, base, variant, docs)


def _own_log_probs(model, docs):
    import torch

    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1) for ids in docs]


def _check_llama_stats(got, base, variant, docs):
    """The llama.cpp statistics of a cell against numpy over per-token values computed here from
    both models' own logits (not through the reference, the hooks or `summarize`)."""
    import torch

    kl, agree, dp = [], [], []
    for p, q, ids in zip(_own_log_probs(base, docs), _own_log_probs(variant, docs), docs):
        kl.append((p.exp() * (p - q)).sum(-1).numpy())
        agree.append((p.argmax(-1) == q.argmax(-1)).numpy())
        nxt = torch.tensor(ids[1:])[:, None]
        dp.append((q.gather(1, nxt).exp() - p.gather(1, nxt).exp())[:, 0].numpy())  # the actual next token
    kl, agree, dp = np.concatenate(kl), np.concatenate(agree), np.concatenate(dp)
    n = kl.size
    for q, name in [(50, "kl_median"), (90, "kl_p90"), (95, "kl_p95"), (99, "kl_p99"), (99.9, "kl_p999")]:
        assert getattr(got, name) == pytest.approx(np.percentile(kl, q), rel=1e-2), name
    assert got.kl_max == pytest.approx(kl.max(), rel=1e-2)
    assert got.kl_se == pytest.approx(kl.std(ddof=1) / math.sqrt(n), rel=1e-2)
    assert abs(got.top1_agree - agree.mean()) <= 2 / n  # an argmax tie may break the other way
    assert got.top1_se == pytest.approx(math.sqrt(agree.mean() * (1 - agree.mean()) / (n - 1)), rel=2e-2)
    assert got.dp_mean == pytest.approx(dp.mean(), abs=1e-5)
    assert got.dp_se == pytest.approx(dp.std(ddof=1) / math.sqrt(n), rel=1e-2)
    assert got.dp_rms == pytest.approx(math.sqrt((dp ** 2).mean()), rel=1e-2) and got.dp_rms > 0


def test_statistics_are_numpy_over_the_stored_per_token_values(peaked_model_dir, docs):
    """What the cell stores is numpy over the per-token values the capture computed, exactly."""
    r = resolve_model(str(peaked_model_dir))
    ref = _run(load_model(r, FORMATS.get("none"), "cpu").model, docs).reference()
    cap = _run(load_model(r, FORMATS.get("bnb-nf4"), "cpu").model, docs, ref)
    got = cap.result()
    kl = np.concatenate(cap.kls)
    assert kl.size == got.tokens > 100
    assert [got.kl_median, got.kl_p90, got.kl_p95, got.kl_p99, got.kl_p999, got.kl_max] == \
        pytest.approx(list(np.percentile(kl, [50, 90, 95, 99, 99.9, 100])), rel=1e-12)


def _llama_cpp_stats(kl, agree, dp):
    """Re-written from llama.cpp tools/perplexity/perplexity.cpp (`kl_divergence`): running sums, the
    population variance over n-1, sorted values with its own interpolation, its median."""
    n = len(kl)

    def mean_unc(s, s2):
        f = s / n
        df = s2 / n - f * f
        return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)

    def percentile(vals, fraction):
        p = fraction * (len(vals) - 1)
        ip = int(p)
        p -= ip
        return (1 - p) * vals[ip] + p * vals[min(ip + 1, len(vals) - 1)]

    ks = sorted(kl)
    median = 0.5 * (ks[n // 2] + ks[n // 2 - 1]) if n % 2 == 0 else ks[n // 2]
    kl_mean, kl_se = mean_unc(sum(kl), sum(k * k for k in kl))
    dp_mean, dp_se = mean_unc(sum(dp), sum(d * d for d in dp))
    mse, mse_unc = mean_unc(sum(d * d for d in dp), sum(d ** 4 for d in dp))
    top = sum(agree) / n
    return {"kl_mean": kl_mean, "kl_se": kl_se, "kl_median": median, "kl_p90": percentile(ks, 0.9),
            "kl_p95": percentile(ks, 0.95), "kl_p99": percentile(ks, 0.99), "kl_p999": percentile(ks, 0.999),
            "kl_max": ks[-1], "top1_agree": top, "top1_se": math.sqrt(top * (1 - top) / (n - 1)),
            "dp_mean": dp_mean, "dp_se": dp_se, "dp_rms": math.sqrt(mse), "dp_rms_se": 0.5 / math.sqrt(mse) * mse_unc}


@pytest.mark.parametrize("n", [1001, 5002])
def test_summarize_matches_llama_cpp_formulas(n):
    rng = np.random.default_rng(n)
    kl = rng.lognormal(-4, 2, n)  # heavy right tail, like per-token KL
    agree = rng.random(n) < 0.8
    ref_lp = np.log(rng.uniform(0.01, 1, n))
    var_lp = np.log(np.clip(np.exp(ref_lp) + rng.normal(0, 0.05, n), 1e-6, 1))
    got = summarize(kl, agree, var_lp, ref_lp)
    want = _llama_cpp_stats(list(kl), list(agree), list(np.exp(var_lp) - np.exp(ref_lp)))
    for name, value in want.items():
        assert getattr(got, name) == pytest.approx(value, rel=1e-9), name
    assert got.tokens == n and got.ppl_ratio == pytest.approx(math.exp(ref_lp.mean() - var_lp.mean()))


def test_standard_errors_match_the_spread_over_simulated_corpora():
    """Each standard error against the standard deviation of its statistic over 2,000 simulated
    corpora (n = 400 tokens): the binomial one of same-top-1, the mean KL's on a skewed KL, and the
    delta-method one of RMS Δp."""
    rng = np.random.default_rng(21)
    n, reps = 400, 2000
    out = [summarize(rng.exponential(0.05, n), rng.random(n) < 0.9, np.log(rng.uniform(0.2, 0.6, n)),
                     np.log(np.full(n, 0.4))) for _ in range(reps)]
    for value, se in [("top1_agree", "top1_se"), ("kl_mean", "kl_se"), ("dp_mean", "dp_se"), ("dp_rms", "dp_rms_se")]:
        spread = np.std([getattr(o, value) for o in out], ddof=1)
        assert np.mean([getattr(o, se) for o in out]) == pytest.approx(spread, rel=0.08), se


def test_an_old_record_without_the_statistics_renders_not_recorded(tmp_path):
    """A store written before these statistics (main at 491cb25) still reports: the stored numbers
    as they were, the new ones "not recorded (rerun)", empty in divergence.csv; nothing rewritten."""
    import pandas as pd

    from qeval.cli import main
    from qeval.report.sections.divergence import NOT_RECORDED
    from qeval.store.columns import KL_STAT_COLUMNS
    from qeval.store.record import Record
    from qeval.store.store import Store

    lines = (Path(__file__).parent / "data" / "records_v_main.jsonl").read_text().splitlines()
    old = [Record.from_json(json.loads(x)) for x in lines]
    measured = [r for r in old if r.divergence is not None and r.divergence.measured]
    assert measured and all(r.divergence.kl_median is None for r in measured)
    assert all(r.divergence.to_json() == json.loads(x).get("divergence") for r, x in zip(old, lines) if r.divergence)
    store = tmp_path / "old.sqlite"
    with Store(store) as s:
        for r in old:
            s.put(r)
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    section = md[md.index("## Beyond accuracy"):]
    assert NOT_RECORDED in section and "kl-divergence" in section
    csv = pd.read_csv(tmp_path / "out" / "divergence.csv")
    assert set(KL_STAT_COLUMNS) <= set(csv.columns) and csv[KL_STAT_COLUMNS].isna().all().all()
    assert sorted(set(csv["kl_mean"])) == pytest.approx(sorted({r.divergence.kl_mean for r in measured}))


def test_baseline_against_itself_is_exactly_zero(tiny_model_dir, docs):
    r = resolve_model(str(tiny_model_dir))
    ref = _run(load_model(r, FORMATS.get("none"), "cpu").model, docs).reference()
    again = _run(load_model(r, FORMATS.get("none"), "cpu").model, docs, ref).result()  # a second load
    assert again.kl_mean == 0.0 and again.kl_max == 0.0
    assert again.top1_agree == 1.0 and again.ppl_ratio == 1.0


def test_unknown_windows_and_batches_are_counted_not_compared(tiny_model_dir, docs):
    import torch

    r = resolve_model(str(tiny_model_dir))
    model = load_model(r, FORMATS.get("none"), "cpu").model
    ref = _run(model, docs[:1]).reference()
    cap = _run(model, docs, ref)
    assert cap.unmatched == len(docs) - 1 and cap.result().tokens == len(docs[0]) - 1
    with Capture(model, ref) as cap2, torch.no_grad():
        model(torch.tensor([docs[0][:10], docs[0][:10]]))
    assert cap2.batched == 1 and cap2.result() is None


def _mcnemar_p(rw, wr):
    """Independent exact McNemar: two-sided, the discordant pairs against Binomial(n, 1/2)."""
    n = rw + wr
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(rw, wr) + 1)) / 2 ** n)


def test_mcnemar_exact_values():
    for rw, wr in [(0, 0), (5, 5), (6, 0), (10, 2), (4, 0), (9, 2)]:
        base = [{"doc_id": i, "doc_hash": str(i), "acc": 1.0 if i < rw else 0.0} for i in range(40)]
        var = [{**b, "acc": 0.0 if b["doc_id"] < rw else (1.0 if rw <= b["doc_id"] < rw + wr else 0.0)} for b in base]
        # McNemar's exact p is the divergence table's extra column (the verdict's p: Tango's score test)
        assert compare_pair(base, var, "acc", True).mcnemar_p == pytest.approx(_mcnemar_p(rw, wr))


def test_paired_flips_and_interval():
    base = [{"doc_id": i, "doc_hash": str(i), "acc": float(i % 2 == 0)} for i in range(40)]
    # the variant gets documents 0,2,4,6 wrong (right->wrong) and 1 right (wrong->right)
    var = [{**b, "acc": 0.0 if b["doc_id"] in (0, 2, 4, 6) else (1.0 if b["doc_id"] == 1 else b["acc"])} for b in base]
    out = compare_pair(base, var, "acc", True)
    assert (out.right_to_wrong, out.wrong_to_right, out.flips) == (4, 1, 5)
    assert out.delta == pytest.approx(-3 / 40)
    assert out.ci_lo <= out.delta <= out.ci_hi
    assert out.mcnemar_p == pytest.approx(_mcnemar_p(4, 1))
    with pytest.raises(ValueError, match="differs"):
        compare_pair(base, [{**var[0], "doc_hash": "other"}], "acc", True)


def test_bf16_reference_is_recomputed_in_bf16(peaked_model_dir, docs):
    """A bf16 baseline against its own reference is exactly 0 (its logits are recomputed in bf16, not
    float32), and a bf16 model against a float32 reference gives the KL of both models' own logits."""
    import torch

    r = resolve_model(str(peaked_model_dir))
    bf16 = lambda: load_model(r, FORMATS.get("none"), "cpu", torch.bfloat16).model
    ref = _run(bf16(), docs).reference()
    assert ref.logits_dtype == "bfloat16"
    again = _run(bf16(), docs, ref).result()
    assert again.kl_max == 0.0 and again.top1_agree == 1.0
    fp32 = load_model(r, FORMATS.get("none"), "cpu").model
    got = _run(bf16(), docs, _run(fp32, docs).reference()).result()
    exact = exact_kl(fp32, bf16(), docs, "cpu")
    assert got.kl_mean > 0 and abs(got.kl_mean - exact.mean()) / exact.mean() < 1e-3
