"""Each statistics kind (qeval.stats.kinds): its MDE against an independent computation, and the noise
`qeval bench-gates` simulates for it by simulation (seeded, fast). Registers nothing: every kind in
`KINDS` must have its checks here, so a new kind without them fails `test_every_kind_is_checked`."""
import math
from statistics import NormalDist

import numpy as np
import pytest

from qeval.stats import KINDS, compare_values
from qeval.stats.kinds.loglikelihood_ratio import JITTER as LL_JITTER
from qeval.stats.kinds.mean import JITTER as MEAN_JITTER

pytestmark = pytest.mark.unit

ALPHA, POWER = 0.05, 0.8
# z_{1-alpha/2} + z_power from the standard library, not scipy (which the kinds use)
Z = NormalDist().inv_cdf(1 - ALPHA / 2) + NormalDist().inv_cdf(POWER)
CHECKED = {"right_wrong", "loglikelihood_ratio", "mean", "corpus", "corpus_points"}


def test_every_kind_is_checked():
    assert set(KINDS) == CHECKED


def test_units_and_what_bench_gates_plants_are_the_kinds_own():
    assert {k: KINDS.get(k).unit for k in CHECKED} == {
        "right_wrong": "absolute", "loglikelihood_ratio": "relative", "mean": "absolute", "corpus": "absolute",
        "corpus_points": "absolute"}
    assert [k for k in sorted(CHECKED) if KINDS.get(k).relative] == ["loglikelihood_ratio"]
    assert {k: KINDS.get(k).plant for k in CHECKED} == {
        "right_wrong": "drop", "loglikelihood_ratio": "rise", "mean": "", "corpus": "", "corpus_points": ""}


# ----------------------------------------------------------------------------- right_wrong: Tango's score test

def power_from_first_principles(n: int, psi: float, delta: float, alpha: float) -> float:
    """P(the two-sided score test at 0 finds the drop), summing every (discordant d, wrong->right k)
    outcome with math.comb: d ~ Binomial(n, psi + delta), k | d ~ Binomial(d, (psi/2) / (psi + delta));
    a drop is found when k is the low tail and 2 (1 - Phi((d - 2k - 1/4) / sqrt(d))) < alpha."""
    t = min(1.0, psi + delta)
    q = (psi / 2) / t
    total = 0.0
    for d in range(n + 1):
        p_d = math.comb(n, d) * t ** d * (1 - t) ** (n - d)
        if p_d < 1e-15:
            continue
        for k in range(d + 1):
            if k >= d / 2 or 2 * (1 - NormalDist().cdf((d - 2 * k - 0.25) / math.sqrt(d))) >= alpha:
                break
            total += p_d * math.comb(d, k) * q ** k * (1 - q) ** (d - k)
    return total


@pytest.mark.parametrize("n,psi,alpha", [(120, 0.03, 0.05), (200, 0.0, 0.05), (150, 0.05, 0.05 / 48)])
def test_right_wrong_mde_is_where_independent_power_reaches_eighty_percent(n, psi, alpha):
    kind = KINDS.get("right_wrong")
    mde = kind.mde(n, psi, alpha)
    assert power_from_first_principles(n, psi, mde, alpha) >= POWER - 1e-9
    assert power_from_first_principles(n, psi, mde - 1e-4, alpha) < POWER
    # the stricter level of a gate under FDR: the same exact calculation again, not a z rescaling
    assert kind.mde_at(n, psi, kind.mde(n, psi), alpha) == pytest.approx(mde)


def test_right_wrong_comparison_reports_the_mde_at_its_measured_flip_rate():
    rng = np.random.default_rng(3)
    ref = (rng.random(120) < 0.7).astype(float)
    var = ref.copy()
    var[:4] = 1 - var[:4]  # 4 flips of 120
    c = compare_values(ref, var, "acc", True)
    assert c.kind == "right_wrong" and c.mde == KINDS.get("right_wrong").mde(120, 4 / 120)
    assert power_from_first_principles(120, round(4 / 120, 4), c.mde, ALPHA) >= POWER - 1e-9


def test_right_wrong_night_noise_flips_symmetrically_at_its_rate_and_rarely_alarms():
    kind, rng = KINDS.get("right_wrong"), np.random.default_rng(11)
    values = (np.arange(300) < 210).astype(float)  # 70% right: symmetric flips must not follow the accuracy
    rate, nights = 0.04, 400
    rw = wr = alarms = 0
    for _ in range(nights):
        noisy = kind.night_noise(values, rate, rng)
        rw += int(((values == 1) & (noisy == 0)).sum())
        wr += int(((values == 0) & (noisy == 1)).sum())
        alarms += compare_values(values, noisy, "acc", True, kind="right_wrong").p_value < ALPHA
    expected = rate * len(values) / 2 * nights  # each way
    assert abs(rw - expected) < 4 * math.sqrt(expected) and abs(wr - expected) < 4 * math.sqrt(expected)
    assert alarms / nights <= ALPHA + 0.03  # the exact test is conservative: at most alpha, give or take chance


def test_right_wrong_planted_drop_loses_exactly_that_many_right_answers():
    kind, rng = KINDS.get("right_wrong"), np.random.default_rng(5)
    values = (np.arange(100) < 60).astype(float)
    planted = kind.plant_regression(values.copy(), 7, rng)
    assert values.sum() - planted.sum() == 7 and not ((values == 0) & (planted == 1)).any()


# ----------------------------------------------------------------------------- loglikelihood_ratio: paired t

def perplexity_docs(n: int, rng, shift: float = 0.0, noise: float = 0.02):
    """(log-likelihood, token count) per document, and a variant whose per-token log-likelihood moves by
    `shift` (negative: worse) plus per-document noise of sd `noise` nats per document."""
    counts = rng.integers(20, 80, n).astype(float)
    ll = -counts * rng.uniform(2.0, 3.0, n)
    var_ll = ll + shift * counts + rng.normal(0, noise, n)
    return [[a, w] for a, w in zip(ll, counts)], [[a, w] for a, w in zip(var_ll, counts)]


@pytest.mark.parametrize("metric", ["word_perplexity", "bits_per_byte"])
def test_loglikelihood_ratio_mde_matches_the_closed_form(metric):
    rng = np.random.default_rng(2)
    ref, var = perplexity_docs(150, rng)
    c = compare_values(ref, var, metric, False)
    d = np.array([-(v[0] - r[0]) for r, v in zip(ref, var)])
    W = sum(r[1] for r in ref)
    log_ref = -sum(r[0] for r in ref) / W
    log_mde = Z * float(np.std(d, ddof=1)) / math.sqrt(len(d)) * len(d) / W  # in the aggregate's log space
    expected = log_mde / log_ref if metric == "bits_per_byte" else math.expm1(log_mde)
    assert c.kind == "loglikelihood_ratio" and c.mde == pytest.approx(expected, rel=1e-9)
    strict = KINDS.get("loglikelihood_ratio").mde_at(150, math.nan, c.mde, ALPHA / 48)
    z_strict = NormalDist().inv_cdf(1 - ALPHA / 96) + NormalDist().inv_cdf(POWER)
    assert strict == pytest.approx(c.mde * z_strict / Z, rel=1e-9)


def test_loglikelihood_ratio_mde_is_detected_eighty_percent_of_the_time():
    """A true shift of exactly the kind's MDE (in log-likelihood per document, at a per-document
    noise sd), on top of that noise: the t-test finds it in about 80% of simulated variants."""
    rng = np.random.default_rng(7)
    ref, _ = perplexity_docs(200, rng)
    noise = 0.5
    shift = KINDS.get("loglikelihood_ratio").mde(len(ref), noise)
    hits, sims = 0, 300
    for _ in range(sims):
        var = [[r[0] - shift - rng.normal(0, noise), r[1]] for r in ref]
        hits += compare_values(ref, var, "word_perplexity", False).p_value < ALPHA
    assert abs(hits / sims - POWER) < 0.08


def test_loglikelihood_ratio_night_noise_is_a_relative_jitter_and_rarely_alarms():
    kind, rng = KINDS.get("loglikelihood_ratio"), np.random.default_rng(13)
    ref, _ = perplexity_docs(150, rng)
    values = np.array(ref, dtype=float)
    assert kind.simulates(ref) and not kind.simulates([-2.5, -3.1])  # a bare log-likelihood has no count
    alarms, nights, rel = 0, 300, []
    for _ in range(nights):
        noisy = kind.night_noise(values, 0.0, rng)
        assert (noisy[:, 1] == values[:, 1]).all()
        rel.append(noisy[:, 0] / values[:, 0] - 1)
        alarms += compare_values(values, noisy, "word_perplexity", False, kind="loglikelihood_ratio").p_value < ALPHA
    assert float(np.std(np.concatenate(rel))) == pytest.approx(LL_JITTER, rel=0.05)
    assert 0.01 <= alarms / nights <= 0.09  # the t-test holds its level on noise alone: about alpha


def test_loglikelihood_ratio_planted_rise_moves_the_aggregate_by_exactly_that_much():
    kind, rng = KINDS.get("loglikelihood_ratio"), np.random.default_rng(17)
    ref, _ = perplexity_docs(80, rng)
    values = np.array(ref, dtype=float)
    planted = kind.plant_regression(values.copy(), 0.03, rng)
    ppl = [math.exp(-v[:, 0].sum() / v[:, 1].sum()) for v in (values, planted)]
    assert ppl[1] / ppl[0] - 1 == pytest.approx(0.03, rel=1e-9)


# ----------------------------------------------------------------------------- mean: BCa bootstrap

def test_mean_mde_matches_the_closed_form():
    rng = np.random.default_rng(19)
    ref = rng.uniform(0, 1, 60)
    var = ref + rng.normal(0, 0.05, 60)
    c = compare_values(ref, var, "score", True)
    assert c.kind == "mean"
    assert c.mde == pytest.approx(Z * float(np.std(var - ref, ddof=1)) / math.sqrt(60), rel=1e-9)
    assert KINDS.get("mean").mde_at(60, math.nan, c.mde, ALPHA / 10) == pytest.approx(
        c.mde * (NormalDist().inv_cdf(1 - ALPHA / 20) + NormalDist().inv_cdf(POWER)) / Z, rel=1e-9)


def test_mean_night_noise_is_a_small_jitter_and_rarely_alarms():
    kind, rng = KINDS.get("mean"), np.random.default_rng(23)
    values = rng.uniform(0, 1, 40)
    alarms, nights, diffs = 0, 120, []
    for _ in range(nights):
        noisy = kind.night_noise(values, 0.0, rng)
        diffs.append(noisy - values)
        alarms += compare_values(values, noisy, "score", True, kind="mean").p_value < ALPHA
    assert float(np.std(np.concatenate(diffs))) == pytest.approx(MEAN_JITTER, rel=0.05)
    assert alarms / nights <= 0.12  # BCa on 40 documents runs a little hot, never wildly


# ----------------------------------------------------------------------------- corpus kinds: bootstrap over documents

@pytest.mark.parametrize("name", ["corpus", "corpus_points"])
def test_corpus_mde_is_z_bootstrap_standard_errors(name):
    """With lm-eval's `mean` as the corpus aggregation, the bootstrap's standard error of the
    difference is sd(d)/sqrt(n) (to resampling noise), so the MDE is the closed form of a mean's."""
    rng = np.random.default_rng(29)
    ref = rng.uniform(0, 1, 200)
    var = ref + rng.normal(0.01, 0.1, 200)
    c = KINDS.get(name).compare(list(ref), list(var), metric="m", higher_is_better=True, min_effect=0.01,
                                alpha=ALPHA, noise_rate=None, aggregation="mean")
    assert c.mde == pytest.approx(Z * float(np.std(var - ref, ddof=1)) / math.sqrt(200), rel=0.08)
    assert KINDS.get(name).mde(200, 0.004) == pytest.approx(Z * 0.004)  # the spread already is a standard error


@pytest.mark.parametrize("name", ["corpus", "corpus_points"])
def test_corpus_kinds_have_no_simulated_nights(name):
    kind = KINDS.get(name)
    assert not kind.simulates([[1, 0]] * 30) and kind.night_rate(0.02) is None
    with pytest.raises(NotImplementedError):
        kind.night_noise(np.zeros(3), 0.0, np.random.default_rng(0))
