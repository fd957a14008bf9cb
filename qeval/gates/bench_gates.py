"""`qeval bench-gates`: how often the nightly cries wolf, and what it catches, on the default plan.

Replays the stored per-document outputs of every cell of the store (the default plan: 48 cells) as
simulated nights and gates each one exactly as `qeval nightly` does: every cell and metric compared
with the stored outputs (`qeval.stats.paired`), Benjamini-Hochberg over the night, the plan's minimum
meaningful effects.

- No-change nights: right/wrong outputs flip symmetrically (as many right->wrong as wrong->right
  expected) at the task's measured flip rate -- the lowest rate any variant flips against the float
  baseline, the noise of a numerically different but equivalent computation, the same rate the
  report's MDE assumes; every log-likelihood is jittered by a relative 1e-4. A night with any
  regression is a false alarm.
- Planted accuracy drops: on top of that noise, one cell (a random arm) of each right/wrong task
  loses the nightly's detectable change at `DETECT_POWER` (90%): the smallest drop the verdict's test
  finds with that power at the level a single regression must reach under the night's FDR control
  (q / comparisons), in right->wrong flips. Earlier versions planted twice the MDE at alpha 0.05 as
  a stand-in for it; that stand-in depends on the test's power at 0.05, not at the nightly's level
  (at n = 60 twice Tango's MDE at 0.05 is 15 documents, below the 20 the nightly needs for 90%), so
  a more powerful test at 0.05 planted smaller drops and "lost" detection it never had.
- Planted perplexity rise: one perplexity cell rises by 3% (per-document log-likelihood changes
  drawn from a Gamma(2) around that mean, so documents disagree as they do in reality).

Seeded; runs in well under a minute.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from qeval.core.errors import QevalError
from qeval.stats.compare import latest, paired_frame, task_mde
from qeval.stats.kinds.loglikelihood_ratio import JITTER as PPL_JITTER
from qeval.stats.paired import FDR_METHOD, KINDS, WORSE, compare_values, fdr_verdicts, kind_of

SEED = 20260101
PPL_RISE = 0.03  # the planted rise of a kind that plants "rise" (perplexity)
DETECT_POWER = 0.9  # the planted drop: the nightly's detectable change at this power (the target)


def _load(store_path: Path):
    from qeval.store.store import Store

    if not Path(store_path).is_file():
        raise QevalError("default-plan store", str(store_path), "a store holding the default plan's results",
                         "run `make report` first (or pass --store PATH)")
    with Store(store_path, readonly=True) as store:
        records = latest(list(store.records()))
        samples = {r.key: store.samples(r.key) for r in records}
    if not records:
        raise QevalError("default-plan store", str(store_path), "stored cells", "run `make report` first")
    return records, samples


def _cells(records, samples):
    """One entry per cell and metric the nightly would compare: aligned per-document values."""
    out = []
    for r in records:
        ss = samples.get(r.key) or []
        for metric, m in r.metrics.items():
            vals = [s[metric] for s in ss if metric in s]
            if not vals:
                continue
            kind = kind_of(metric, vals, m.aggregation)
            if not KINDS.get(kind).simulates(vals):
                continue  # e.g. corpus metrics: no simulated nights for them (their kind resamples documents)
            arr = np.array(vals, dtype=float)
            out.append({"task": r.task.name, "metric": metric, "kind": kind, "values": arr,
                        "hib": bool(m.higher_is_better), "primary": metric == r.primary_metric,
                        "arm": r.variant.arm, "is_baseline": r.variant.is_baseline})
    return out


def _flip_rates(mde) -> dict[tuple[str, str], float]:
    """Per (task, metric) whose kind draws its night at a measured rate (right/wrong: the flip rate
    the report's MDE assumes, the lowest any variant shows against the baseline): that rate, used
    as the night-to-night noise."""
    if mde is None:
        return {}
    rates = {k: KINDS.get(r.kind).night_rate(r.flip_rate) for k, r in mde.iterrows()}
    return {k: rate for k, rate in rates.items() if rate is not None}


def _noisy(c, rate, rng):
    """A no-change night of one cell: the noise its kind simulates."""
    return KINDS.get(c["kind"]).night_noise(c["values"], rate, rng)


def _compare(c, ref, var, th):
    """The nightly's comparison of one cell and metric, on aligned per-document arrays."""
    return compare_values(ref, var, c["metric"], c["hib"], th.min_effect, kind=c["kind"])


def _night(cells, rates, th, rng, plant=None):
    """Gate one simulated night; `plant` = (cell index, planted values). Returns the verdicts."""
    comps = []
    for i, c in enumerate(cells):
        var = plant[1] if plant and plant[0] == i else _noisy(c, rates.get((c["task"], c["metric"]), 0.0), rng)
        comps.append(_compare(c, c["values"], var, th))
    return [v for _, v in fdr_verdicts(comps, th.fdr)]


def run(store_path: Path, out_dir: Path, nights: int = 1000, plan_path: Path | None = None,
        detect_nights: int | None = None) -> str:
    from qeval.gates.nightly import thresholds_of
    from qeval.run.plan import load_plan
    from qeval.store.store import Store

    t0 = time.perf_counter()
    plan_path = plan_path or Path("plans") / "default.yaml"
    th = thresholds_of(load_plan(plan_path))
    records, samples = _load(store_path)
    cells = _cells(records, samples)
    with Store(store_path, readonly=True) as store:
        pairs = paired_frame(records, store.samples, th.min_effect)
    mde = task_mde(pairs).set_index(["task", "metric"]) if not pairs.empty else None
    rates = _flip_rates(mde)
    rng = np.random.default_rng(SEED)

    alarms = 0
    for _ in range(nights):
        alarms += any(v == WORSE for v in _night(cells, rates, th, rng))

    detect_nights = detect_nights or max(100, nights // 5)
    rows = []
    for (task, metric), rate in sorted(rates.items()):
        idx = [i for i, c in enumerate(cells) if c["task"] == task and c["metric"] == metric and c["primary"]
               and not c["is_baseline"]]
        if not idx or mde is None or (task, metric) not in mde.index:
            continue
        n_docs = len(cells[idx[0]]["values"])
        kind = KINDS.get(cells[idx[0]]["kind"])
        drop = kind.mde_at(n_docs, rate, float(mde.loc[(task, metric), "mde"]), th.fdr / len(cells), DETECT_POWER)
        k = math.ceil(drop * n_docs - 1e-9)  # at least the detectable change (the bisection lands just above it)
        # a drop of k documents needs k right answers to lose: plant it where the arm has them
        idx = [i for i in idx if cells[i]["values"].sum() >= k + n_docs * rate]
        if not idx:
            rows.append((f"{task} {metric}: drop of {drop * 100:.1f} pts: no arm has {k} right answers "
                         "to lose", math.nan))
            continue
        hits = 0
        for _ in range(detect_nights):
            i = int(rng.choice(idx))
            c = cells[i]
            var = KINDS.get(c["kind"]).plant_regression(_noisy(c, rate, rng), k, rng)
            hits += _night(cells, rates, th, rng, plant=(i, var))[i] == WORSE
        rows.append((f"{task} {metric}: drop of {drop * 100:.1f} pts = nightly MDE at {DETECT_POWER:.0%} power ({k} of {n_docs} documents; "
                     f"noise flip rate {rate:.1%}; planted in {len(idx)} arms)", hits / detect_nights))
    ppl_idx = [i for i, c in enumerate(cells) if KINDS.get(c["kind"]).plant == "rise" and c["primary"]]
    if ppl_idx:
        hits = 0
        for _ in range(detect_nights):
            i = int(rng.choice(ppl_idx))
            c = cells[i]
            var = KINDS.get(c["kind"]).plant_regression(_noisy(c, 0, rng), PPL_RISE, rng)
            hits += _night(cells, rates, th, rng, plant=(i, var))[i] == WORSE
        rows.append((f"{cells[ppl_idx[0]]['task']} {cells[ppl_idx[0]]['metric']}: a {PPL_RISE:.0%} rise", hits / detect_nights))

    tests = len(cells)
    lines = ["# Nightly gates: false alarms and detection (simulated on the stored default plan)", "",
             f"Store: {store_path}; plan thresholds: {plan_path.name}; {len(records)} cells, {tests} comparisons per "
             f"night (every cell and metric, as `qeval nightly` does); {FDR_METHOD} at q = {th.fdr:g}; minimum "
             f"meaningful effects: {th.min_effect or 'defaults'} (defaults: 1 accuracy point, 0.5% perplexity); "
             f"seed {SEED}.", "",
             "| measure | rate | target |", "|---|---:|---|",
             f"| false alarm per no-change night ({nights} nights: symmetric flips at the measured rates, "
             f"log-likelihood jitter {PPL_JITTER:g}) | {alarms / nights:.1%} | <= 2% |"]
    lines += [f"| detection: {name} ({detect_nights} nights) | {'n/a' if rate != rate else f'{rate:.1%}'} | >= 90% |"
              for name, rate in rows]
    lines += ["", f"Computed in {time.perf_counter() - t0:.1f} s."]
    text = "\n".join(lines) + "\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gates.md").write_text(text, encoding="utf-8")
    return text
