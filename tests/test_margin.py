"""Non-inferiority margins and sample sizes (qeval.stats.margin, `qeval plan-n`): the three verdicts
on constructed comparisons, the margin's resolution and parsing, and the sample sizes checked by
simulating the test at the computed n (seeded)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qeval.cli import main
from qeval.core.errors import QevalError
from qeval.stats.comparison import Comparison
from qeval.stats.margin import (BEYOND, CANNOT_TELL, NOT_TESTED, WITHIN, documents_right_wrong, documents_spread,
                                margin_columns, margin_sentence, margin_verdict, parse_margin, resolve_margin)

pytestmark = pytest.mark.unit


def comparison(lo: float, hi: float, kind: str = "right_wrong", metric: str = "acc") -> Comparison:
    """A comparison whose effect interval is [lo, hi] (positive = better); the rest is filler."""
    mid = (lo + hi) / 2
    return Comparison(metric, kind, "test", 100, 0.5, 0.5 + mid, mid, lo, hi, mid, lo, hi, 0.5, 0.01, 0.05)


@pytest.mark.parametrize("lo, hi, verdict", [
    (-0.005, 0.02, WITHIN),        # the whole interval above -1 point (it reaches a gain: still within)
    (-0.04, -0.02, BEYOND),        # wholly below -1 point
    (-0.02, 0.001, CANNOT_TELL),   # straddles -1 point
    (-0.01, 0.0, CANNOT_TELL),     # touching -margin is not "above" it
    (math.nan, math.nan, NOT_TESTED)])
def test_three_verdicts_on_constructed_comparisons(lo, hi, verdict):
    cols = margin_columns(comparison(lo, hi), "qeval_analogy", None)
    assert cols["margin"] == 0.01 and cols["margin_label"] == "1 point"
    assert cols["margin_verdict"] == verdict == margin_verdict(lo, hi, 0.01)


def test_margin_resolves_task_then_metric_then_kind_then_default():
    margins = {"qeval_analogy": 0.02, "acc": 0.03, "right_wrong": 0.04, "mmlu": 0.05}
    assert resolve_margin(margins, "qeval_analogy", "acc", "right_wrong") == 0.02
    assert resolve_margin(margins, "other", "acc", "right_wrong") == 0.03
    assert resolve_margin(margins, "other", "exact_match,strict-match", "right_wrong") == 0.04
    assert resolve_margin(margins, "mmlu/stem", "acc", "right_wrong") == 0.05  # a group's entry covers its members
    assert resolve_margin({}, "t", "word_perplexity", "loglikelihood_ratio") == 0.01  # 1%
    assert resolve_margin(None, "t", "acc", "right_wrong") == 0.01  # 1 point
    assert resolve_margin(None, "t", "bleu", "corpus_points") == 1.0  # 1 point of sacrebleu's 0..100
    perplexity = margin_columns(comparison(-0.02, -0.015, "loglikelihood_ratio", "word_perplexity"), "t", None)
    assert perplexity["margin_label"] == "1%" and perplexity["margin_verdict"] == BEYOND


def test_margin_sentence_prints_the_margin():
    one = {"a": (WITHIN, "1 point"), "b": (CANNOT_TELL, "1 point"), "c": (WITHIN, "1 point"), "d": (NOT_TESTED, "")}
    assert margin_sentence(one) == "loss within 1 point shown on 2 of 3 tasks; cannot tell on 1 (b); not tested on 1 (d)"
    mixed = {"a": (BEYOND, "1 point"), "p": (BEYOND, "1%"), "c": (CANNOT_TELL, "1 point")}
    assert margin_sentence(mixed) == ("loss beyond the margin shown on 2 of 3 tasks (1 point on a; 1% on p); "
                                      "cannot tell on 1 (1 point on c)")
    assert margin_sentence({"a": (NOT_TESTED, "")}) == NOT_TESTED


@pytest.mark.parametrize("text, value, relative", [("1pt", 0.01, False), ("0.5pt", 0.005, False),
                                                   ("2 points", 0.02, False), ("1%", 0.01, True)])
def test_parse_margin(text, value, relative):
    assert parse_margin(text) == (pytest.approx(value), relative)


@pytest.mark.parametrize("text", ["1", "1x", "-1pt", "0pt", "pt", ""])
def test_parse_margin_rejects_in_one_line(text):
    with pytest.raises(QevalError) as e:
        parse_margin(text)
    assert "\n" not in str(e.value) and "1pt" in str(e.value)


def _paired_power_by_simulation(n: int, psi: float, loss: float, sims: int, rng) -> float:
    """Right/wrong pairs with noise flips at psi (half each way) and a loss of `loss` (that share more
    right->wrong), each simulated suite judged by the test the report runs (`compare_values` on 0/1
    outputs per document); each distinct flip table is compared once."""
    from functools import lru_cache

    from qeval.stats.paired import compare_values

    @lru_cache(maxsize=None)
    def significant(rw: int, wr: int) -> bool:
        # documents: rw right->wrong, wr wrong->right, the rest right in both (accuracy does not enter
        # the paired test, only the discordant counts and n)
        ref = [1] * rw + [0] * wr + [1] * (n - rw - wr)
        var = [0] * rw + [1] * wr + [1] * (n - rw - wr)
        return compare_values(ref, var, "acc", True, kind="right_wrong").significant

    counts = rng.multinomial(n, [psi / 2 + loss, psi / 2, 1 - psi - loss], size=sims)
    return float(np.mean([significant(int(rw), int(wr)) for rw, wr in counts[:, :2]]))


@pytest.mark.parametrize("margin, psi", [(0.05, 0.10), (0.03, 0.02)])
def test_right_wrong_sample_size_has_80_percent_power_by_simulation(margin, psi):
    n = documents_right_wrong(margin, psi)
    rng = np.random.default_rng(21)
    sims = 4000  # power's standard error ~0.006
    assert _paired_power_by_simulation(n, psi, margin, sims, rng) == pytest.approx(0.8, abs=0.025)
    # and a fifth fewer documents clearly lack it: the n is not just any large number
    assert _paired_power_by_simulation(int(n * 0.8), psi, margin, sims, rng) < 0.77
    # more noise flips need more documents
    assert documents_right_wrong(margin, psi * 2) > n


@pytest.mark.parametrize("margin, sd", [(0.1, 0.5), (0.01, 0.03)])
def test_spread_sample_size_has_80_percent_power_by_simulation(margin, sd):
    n = documents_spread(margin, sd)
    rng = np.random.default_rng(4)
    diffs = rng.normal(-margin, sd, size=(4000, n))
    power = float((stats.ttest_1samp(diffs, 0.0, axis=1).pvalue < 0.05).mean())
    assert power == pytest.approx(0.8, abs=0.025)
    # the textbook normal formula, ((z_0.975 + z_0.8) sd / m)^2, within the t correction (a document or two)
    assert abs(n - ((stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * sd / margin) ** 2) <= 3


def test_plan_n_prints_the_documents(capsys):
    assert main(["plan-n", "any_task", "--margin", "5pt", "--flip-rate", "0.1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("any_task: ") and f"{documents_right_wrong(0.05, 0.1):,} documents" in out
    assert "5 points" in out and "10.00%" in out
    assert main(["plan-n", "lee", "--margin", "1%", "--sd", "0.05"]) == 0
    assert f"{documents_spread(0.01, 0.05):,} documents" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--margin", "1x", "--flip-rate", "0.1"], "--margin '1x'"),
    (["--margin", "1%", "--flip-rate", "0.1"], "accuracy points with --flip-rate"),
    (["--margin", "1pt", "--flip-rate", "0.1", "--sd", "0.2"], "one of them"),
    (["--margin", "1pt", "--flip-rate", "1.5"], "a flip rate in [0, 1)"),
    (["--margin", "1pt"], "pass --flip-rate R")])
def test_plan_n_bad_input_is_one_line_exit_2(argv, says, capsys, tmp_path):
    store = tmp_path / "none.sqlite"
    try:
        rc = main(["plan-n", "qeval_analogy", *argv, "--store", str(store)])
    except SystemExit as e:  # argparse's own checks (a flip rate out of range) exit from the parser
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert not store.exists()  # nothing written


def test_plan_margins_are_checked_together():
    from qeval.gates.nightly import thresholds_of
    from qeval.run.plan import plan_from

    plan = plan_from({"thresholds": {"margin": {"right_wrong": 0.02, "qeval_analogy": -1, "acc": "1pt"}}})
    with pytest.raises(QevalError) as e:
        thresholds_of(plan)
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "thresholds.margin.qeval_analogy" in lines[0] + lines[1] \
        and "thresholds.margin.acc" in lines[0] + lines[1]
    assert thresholds_of(plan_from({"thresholds": {"margin": {"right_wrong": 0.02}}})).margin == {"right_wrong": 0.02}


def test_documents_for_a_margin_never_fall_below_the_tests_minimum_n():
    """A perplexity task whose spread is tiny needs, by power alone, 2 documents; the paired t gives
    no interval on fewer than MIN_N_T, so the plan says MIN_N_T and why. A right/wrong task (exact
    McNemar, no minimum) keeps what its power search found."""
    import pandas as pd

    from qeval.stats.comparison import MIN_N_T
    from qeval.stats.margin import min_documents, task_documents

    tiny = 1e-5  # the MDE of a near-identical variant at n = 12
    pairs = pd.DataFrame([{"task": "ppl", "metric": "word_perplexity", "kind": "loglikelihood_ratio", "pairs": 12,
                           "mde": m, "flip_rate": math.nan, "margin": 0.01, "margin_label": "1%"}
                          for m in (tiny, 2 * tiny)])
    (d,) = task_documents(pairs)
    unfloored = documents_spread(0.01, tiny * math.sqrt(12) / (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)))
    assert unfloored < MIN_N_T  # the power alone would plan fewer documents than the test accepts
    assert d["n_needed"] == d["n_min"] == d["n_max"] == MIN_N_T == min_documents("loglikelihood_ratio")
    assert d["n_floor"] == MIN_N_T and "paired t" in d["floor_note"]
    rw = pd.DataFrame([{"task": "acc", "metric": "acc", "kind": "right_wrong", "pairs": 100, "mde": 0.1,
                        "flip_rate": 0.02, "margin": 0.05, "margin_label": "5 points"}])
    (r,) = task_documents(rw)
    assert r["n_needed"] == documents_right_wrong(0.05, 0.02) and r["n_floor"] is None and not r["floor_note"]
