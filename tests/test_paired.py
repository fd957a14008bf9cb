"""The one paired comparison: each case the issue lists, checked against an independent computation."""
import math
from statistics import NormalDist

import numpy as np
import pytest
from scipy import stats

from qeval.stats.compare import results_frame
from qeval.core.errors import QevalError
from qeval.stats.paired import (KINDS, compare_pair, compare_values, kind_of, fdr_adjust, fdr_verdicts, paired_mde, paired_power, recovery,
                          recovery_fails)


def mcnemar_p(rw: int, wr: int) -> float:
    """Exact two-sided McNemar from first principles (math.comb), independent of scipy."""
    n = rw + wr
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(rw, wr) + 1)) / 2 ** n)


def right_wrong(n: int, rw: int, wr: int, right: int | None = None, metric: str = "acc"):
    """Baseline and variant samples: `right` documents right in the baseline (default: half), of
    which `rw` turn wrong, and `wr` wrong ones turn right."""
    right = n // 2 if right is None else right
    base = [{"doc_id": i, "doc_hash": f"h{i}", metric: float(i < right)} for i in range(n)]
    var = []
    for s in base:
        i, v = s["doc_id"], s[metric]
        if i < rw:
            v = 0.0
        elif right <= i < right + wr:
            v = 1.0
        var.append({**s, metric: v})
    return base, var


def loglik(n: int = 50, seed: int = 0, metric: str = "word_perplexity"):
    rng = np.random.default_rng(seed)
    counts = rng.integers(80, 400, n).astype(float)
    ll = -counts * rng.normal(4.7, 0.3, n)
    return [{"doc_id": i, "doc_hash": f"h{i}", metric: [float(ll[i]), float(counts[i])]} for i in range(n)]


def score_p(rw: int, wr: int) -> float:
    """The score test at 0 from the standard library: McNemar's statistic (|c - b| - 1/4) / sqrt(b + c)."""
    d = rw + wr
    return 1.0 if d == 0 else 2 * (1 - NormalDist().cdf(max(abs(wr - rw) - 0.25, 0) / math.sqrt(d)))


def score_z_by_grid(rw: int, wr: int, n: int, delta: float) -> float:
    """Tango's score statistic with the nuisance rate found by brute force: the right->wrong rate q
    maximising the multinomial likelihood under `delta` (wrong->right rate q + delta), on a dense
    grid then refined, instead of the closed-form root the implementation uses."""
    lo_q, hi_q = max(0.0, -delta), (1 - delta) / 2
    q = None
    for _ in range(3):
        grid = np.linspace(lo_q, hi_q, 4001)[1:-1] if q is None else np.linspace(max(lo_q, q - step), min(hi_q, q + step), 4001)
        with np.errstate(divide="ignore", invalid="ignore"):
            ll = (rw * np.log(grid) if rw else 0) + (wr * np.log(grid + delta) if wr else 0) \
                + ((n - rw - wr) * np.log(1 - 2 * grid - delta) if n - rw - wr else 0)
        ll = np.where(np.isfinite(ll), ll, -np.inf)
        q = float(grid[int(np.argmax(ll))])
        step = 2 * (grid[1] - grid[0])
    num = wr - rw - n * delta
    num = math.copysign(max(abs(num) - 0.25, 0), num)
    return num / math.sqrt(n * (2 * q + delta * (1 - delta)))


def tango_by_grid(rw: int, wr: int, n: int, z: float = NormalDist().inv_cdf(0.975)) -> tuple[float, float]:
    """The 95% interval as the set {delta: |Z(delta)| < z}, Z from `score_z_by_grid`, by bisection."""
    def bound(f, a, b):  # f(a) > 0 >= f(b)
        for _ in range(40):
            m = (a + b) / 2
            a, b = (m, b) if f(m) > 0 else (a, m)
        return (a + b) / 2
    est = (wr - rw) / n
    lo = bound(lambda x: score_z_by_grid(rw, wr, n, x) - z, -1 + 1e-9, est)
    hi = bound(lambda x: score_z_by_grid(rw, wr, n, x) + z, est, 1 - 1e-9)
    return lo, hi


@pytest.mark.parametrize("rw,wr,n", [(40, 20, 160), (9, 2, 200), (18, 0, 60), (0, 0, 228), (3, 1, 20)])
def test_tango_interval_solves_the_score_equation_by_brute_force(rw, wr, n):
    """The bounds are where |Z| crosses z_0.975, Z computed independently (brute-force nuisance MLE);
    (40, 20, 160) is the worked example of PropCIs' scoreci.mp (Tango's interval, Agresti & Min 2005)."""
    base, var = right_wrong(n, rw, wr, right=max(rw, n // 2))
    c = compare_pair(base, var, "acc", True)
    z, h = NormalDist().inv_cdf(0.975), 1e-4
    assert score_z_by_grid(rw, wr, n, c.ci_lo - h) > z > score_z_by_grid(rw, wr, n, c.ci_lo + h)
    assert score_z_by_grid(rw, wr, n, c.ci_hi - h) > -z > score_z_by_grid(rw, wr, n, c.ci_hi + h)
    assert c.p_value == pytest.approx(score_p(rw, wr))
    assert c.mcnemar_p == pytest.approx(mcnemar_p(rw, wr))  # McNemar's exact p: the extra column


def test_no_flip_gives_an_interval_of_positive_width():
    """d = 0 (228 documents, no flip: an MMLU-STEM group printed "0 [0, 0]"): with no flip
    q(delta) = 0 for delta > 0, so Z = -(n delta - 1/4) / sqrt(n delta (1 - delta)) and the bound
    solves a quadratic, written out here."""
    for n in (20, 228, 1000):
        base, var = right_wrong(n, 0, 0)
        c = compare_pair(base, var, "acc", True)
        z2 = NormalDist().inv_cdf(0.975) ** 2
        # (n x - 1/4)^2 = z^2 n x (1 - x)  ->  (n^2 + z^2 n) x^2 - (n/2 + z^2 n) x + 1/16 = 0
        a, b, cc = n * n + z2 * n, -(n / 2 + z2 * n), 1 / 16
        upper = (-b + math.sqrt(b * b - 4 * a * cc)) / (2 * a)
        assert c.ci_hi == pytest.approx(upper, rel=1e-6) and c.ci_lo == pytest.approx(-upper, rel=1e-6)
        assert c.ci_hi - c.ci_lo > 0 and c.p_value == 1.0 and c.verdict == "within noise"


def test_four_of_three_hundred_is_not_significant():
    base, var = right_wrong(300, rw=4, wr=0, right=200)
    c = compare_pair(base, var, "acc", True)
    assert c.p_value == pytest.approx(score_p(4, 0)) == pytest.approx(0.0608, abs=1e-4)
    assert c.mcnemar_p == pytest.approx(mcnemar_p(4, 0)) == pytest.approx(0.125)
    assert c.ci_lo < 0 < c.ci_hi  # the interval agrees with the test
    assert not c.significant and c.verdict == "within noise"


def test_one_of_one_is_not_significant():
    base, var = right_wrong(1, rw=1, wr=0, right=1)
    c = compare_pair(base, var, "acc", True)
    assert c.p_value == pytest.approx(score_p(1, 0)) and c.verdict == "within noise"


def test_similarity_nine_two_is_a_loss_unconditionally():
    """9 right->wrong, 2 wrong->right of 200: exact McNemar (conditional on the 11 flips) says
    p = 0.065; the unconditional score test p = 0.042 -- the conservatism the issue measured."""
    base, var = right_wrong(200, rw=9, wr=2, right=137)
    c = compare_pair(base, var, "acc", True)
    assert (c.ref_value, c.value) == (pytest.approx(0.685), pytest.approx(0.650))
    assert c.p_value == pytest.approx(score_p(9, 2)) == pytest.approx(0.0418, abs=1e-4)
    assert c.mcnemar_p == pytest.approx(mcnemar_p(9, 2)) == pytest.approx(0.0654, abs=1e-4)
    assert c.verdict == "worse" and c.ci_hi < 0


@pytest.mark.parametrize("n", [20, 100, 300])
def test_interval_excludes_zero_exactly_when_p_is_below_alpha(n):
    for rw in range(0, 12):
        for wr in range(0, 12):
            if rw + wr > n // 2:
                continue
            base, var = right_wrong(n, rw, wr)
            c = compare_pair(base, var, "acc", True)
            assert c.p_value == pytest.approx(score_p(rw, wr))
            assert (c.ci_lo > 0 or c.ci_hi < 0) == (c.p_value < 0.05), (rw, wr)
            assert c.ci_lo <= c.delta <= c.ci_hi and c.ci_hi > c.ci_lo


def test_interval_and_p_agree_on_many_random_tables():
    rng = np.random.default_rng(21)
    for _ in range(1500):
        n = int(rng.choice([1, 5, 20, 60, 300, 1000, 1500]))
        rw, wr, _rest = rng.multinomial(n, rng.dirichlet([0.3, 0.3, 3]))
        ref = np.r_[np.ones(rw), np.zeros(wr), rng.integers(0, 2, n - rw - wr)].astype(float)
        var = np.r_[np.zeros(rw), np.ones(wr), ref[rw + wr:]]
        for alpha in (0.05, 0.01):
            # noise_rate fixed: the MDE (a power calculation per rate) is cached per n, not the point here
            c = compare_values(ref, var, "acc", True, alpha=alpha, noise_rate=0.0)
            assert (c.right_to_wrong, c.wrong_to_right) == (rw, wr)
            assert (c.ci_lo > 0 or c.ci_hi < 0) == (c.p_value < alpha), (n, rw, wr, alpha)
            assert c.ci_lo <= c.delta <= c.ci_hi


def test_significant_but_small_is_below_min_effect():
    base, var = right_wrong(2000, rw=20, wr=2, right=1000)  # -0.9 points, p tiny
    c = compare_pair(base, var, "acc", True)
    assert c.significant and not c.meaningful and c.verdict == "below min effect"
    assert compare_pair(base, var, "acc", True, min_effect=0.005).verdict == "worse"


def test_scaled_loglikelihoods_are_not_a_regression():
    base = loglik()
    var = [{**s, "word_perplexity": [s["word_perplexity"][0] * 1.00001, s["word_perplexity"][1]]} for s in base]
    c = compare_pair(base, var, "word_perplexity", False)
    assert c.significant  # nearly deterministic per document: a tiny change is "significant"...
    assert c.effect == pytest.approx(-(math.exp(1e-5 * 4.7) - 1), rel=0.1)
    assert c.verdict == "below min effect"  # ...but far below 0.5%: not a change anyone acts on


def test_loglikelihood_t_test_matches_scipy_and_a_three_percent_rise_is_worse():
    base = loglik()
    rng = np.random.default_rng(3)
    var = [{**s, "word_perplexity": [s["word_perplexity"][0] - s["word_perplexity"][1] * math.log(1.03)
                                     * rng.gamma(2, 0.5), s["word_perplexity"][1]]} for s in base]
    c = compare_pair(base, var, "word_perplexity", False)
    d = [-(v["word_perplexity"][0] - b["word_perplexity"][0]) for b, v in zip(base, var)]
    assert c.p_value == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    W = sum(s["word_perplexity"][1] for s in base)
    ppl = lambda ss: math.exp(-sum(s["word_perplexity"][0] for s in ss) / W)  # noqa: E731
    assert (c.ref_value, c.value) == (pytest.approx(ppl(base)), pytest.approx(ppl(var)))
    assert c.verdict == "worse" and c.ci_lo > 0 and c.effect < -0.01


def test_bits_per_byte_is_lower_is_better_and_relative():
    base = loglik(metric="bits_per_byte")
    var = [{**s, "bits_per_byte": [s["bits_per_byte"][0] * 1.05, s["bits_per_byte"][1]]} for s in base]
    c = compare_pair(base, var, "bits_per_byte", False)
    W = sum(s["bits_per_byte"][1] for s in base)
    assert c.ref_value == pytest.approx(-sum(s["bits_per_byte"][0] for s in base) / W / math.log(2))
    assert c.effect == pytest.approx(-0.05) and c.verdict == "worse"


def test_continuous_scores_use_bca_with_a_minimum_n():
    rng = np.random.default_rng(0)
    base = [{"doc_id": i, "doc_hash": str(i), "f1": float(x)} for i, x in enumerate(rng.uniform(0, 1, 200))]
    var = [{**s, "f1": s["f1"] - 0.05 + rng.normal(0, 0.02)} for s in base]
    c = compare_pair(base, var, "f1", True)
    assert c.kind == "mean" and c.test.startswith("BCa") and c.verdict == "worse"
    assert (c.ci_lo > 0 or c.ci_hi < 0) == (c.p_value < 0.05)
    few = compare_pair(base[:10], var[:10], "f1", True)
    assert few.verdict == "undefined" and "fewer than" in few.reason


def test_registry_lists_known_kinds():
    with pytest.raises(QevalError, match="right_wrong"):
        KINDS.get("rigth_wrong")
    assert {"right_wrong", "loglikelihood_ratio", "mean"} <= set(KINDS)


def test_mde_is_where_exact_power_reaches_eighty_percent():
    mde = paired_mde(300, 0.03)
    assert paired_power(300, 0.03, mde) >= 0.8 > paired_power(300, 0.03, mde * 0.9)
    # at least 5 one-way flips are needed for p < 0.05: a tiny n can not see small changes
    assert paired_mde(10, 0.0) >= 0.5
    assert paired_mde(300, 0.03, alpha=0.05 / 48) > mde  # stricter level, larger MDE
    # a cross-check by simulation
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):  # noise flips both ways at 1.5% each, plus the drop's right->wrong flips
        good, bad = rng.multinomial(300, [0.015, 0.015 + mde, 1 - 0.03 - mde])[:2]
        hits += score_p(bad, good) < 0.05
    assert abs(hits / 400 - paired_power(300, 0.03, mde)) < 0.07


def test_fdr_is_benjamini_hochberg():
    p = [0.001, 0.01, 0.02, 0.04, 0.5, math.nan]
    adj = fdr_adjust(p)
    assert adj[:5] == pytest.approx(list(stats.false_discovery_control(p[:5])))
    assert math.isnan(adj[5])


def test_symmetric_flips_rarely_raise_a_false_alarm():
    """48 cells of right/wrong tasks, 1-3% symmetric flips, no real change: with BH at 5% a night
    raises an alarm far less often than 48 independent 5% tests would (~91%)."""
    rng = np.random.default_rng(7)
    alarms, nights = 0, 150
    for _ in range(nights):
        comps = []
        for cell in range(48):
            n = (300, 60, 200)[cell % 3]
            right = int(n * 0.6)
            k = rng.binomial(right, rng.uniform(0.01, 0.03) * n / 2 / right)
            j = rng.binomial(n - right, rng.uniform(0.01, 0.03) * n / 2 / (n - right))
            comps.append(compare_pair(*right_wrong(n, k, j, right), "acc", True))
        alarms += any(v == "worse" for _, v in fdr_verdicts(comps, 0.05))
    assert alarms / nights <= 0.03


def test_zero_score_recovers_zero_and_zero_baseline_is_undefined_and_fails():
    assert recovery(0.0, 0.567, True) == 0.0 and recovery_fails(0.0, 0.40)
    assert math.isnan(recovery(0.5, 0.0, True)) and recovery_fails(math.nan, 0.40)
    assert recovery(0.0, 10.0, False) == math.inf  # a perfect perplexity loses nothing
    from tests.test_compare import _rec

    res = results_frame([_rec("none", "cap", "exact_match", 0.567, 0.06),
                         _rec("bnb-nf4", "cap", "exact_match", 0.0, 0.0),
                         _rec("none", "zero", "acc", 0.0, 0.0), _rec("bnb-nf4", "zero", "acc", 0.3, 0.05)])
    res = res.set_index(["quant", "task"])
    assert res.loc[("bnb-nf4", "cap"), "recovery"] == 0.0
    assert math.isnan(res.loc[("bnb-nf4", "zero"), "recovery"]) and res.loc[("bnb-nf4", "zero"), "recovery_undefined"]


def test_corpus_kind_resamples_documents_with_lm_evals_own_aggregation():
    """f1 (a tuple metric): the kind comes from the aggregation, not the name; both values equal
    scikit-learn's f1 on the same items; the interval and the p-value are one statement."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    gold = rng.integers(0, 2, 120)
    ref_pred = np.where(rng.uniform(size=120) < 0.85, gold, 1 - gold)
    var_pred = np.where(rng.uniform(size=120) < 0.6, gold, 1 - gold)
    base = [{"doc_id": i, "doc_hash": str(i), "f1": [int(g), int(p)]} for i, (g, p) in enumerate(zip(gold, ref_pred))]
    var = [{"doc_id": i, "doc_hash": str(i), "f1": [int(g), int(p)]} for i, (g, p) in enumerate(zip(gold, var_pred))]
    c = compare_pair(base, var, "f1", True, aggregation="f1")
    assert c.kind == "corpus" and c.test.startswith("paired bootstrap")
    assert c.ref_value == pytest.approx(f1_score(gold, ref_pred)) and c.value == pytest.approx(f1_score(gold, var_pred))
    assert c.verdict == "worse" and c.ci_hi < 0 and c.p_value < 0.05
    same = compare_pair(base, base, "f1", True, aggregation="f1")
    assert same.delta == 0 and same.verdict == "within noise"
    # the same values named "acc" but aggregated by lm-eval's f1 are still a corpus comparison
    assert kind_of("acc", [s["f1"] for s in base], "f1") == "corpus"


def test_perplexity_aggregation_is_a_loglikelihood_ratio():
    """LAMBADA's perplexity (one log-likelihood per document, exp(-mean)): the paired t on the
    per-document differences, values equal to exp(-mean ll) computed here."""
    rng = np.random.default_rng(4)
    ll = rng.normal(-3, 1, 60)
    base = [{"doc_id": i, "doc_hash": str(i), "perplexity": float(x)} for i, x in enumerate(ll)]
    var = [{**s, "perplexity": s["perplexity"] - 0.2 + rng.normal(0, 0.05)} for s in base]
    c = compare_pair(base, var, "perplexity", False, aggregation="perplexity")
    assert c.kind == "loglikelihood_ratio"
    assert c.ref_value == pytest.approx(math.exp(-np.mean(ll)))
    assert c.value == pytest.approx(math.exp(-np.mean([s["perplexity"] for s in var])))
    assert c.verdict == "worse"
