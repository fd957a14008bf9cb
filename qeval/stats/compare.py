"""Stage: turn stored records into tidy comparison frames (never from in-memory run state).

`results_frame` has one row per (model, quant, adapter, task, metric) with the baseline's value
beside it; `memory_frame` one row per variant with measured vs theoretical bytes. When a cell was
measured several times (a library upgrade, another limit), the newest record of each comparable
group wins; a variant is only compared with a baseline measured on the same documents.
"""
from __future__ import annotations

import math
from typing import Mapping

import pandas as pd

from qeval.train.adapters import not_converged, seed_base
from qeval.stats.paired import Comparison, compare_pair, recovery_undefined, seed_spread, seeds_differ
from qeval.stats.paired import recovery as recovery_of
from qeval.quant.formats import FORMATS, format_order

from qeval.core.names import BASELINE  # noqa: F401  (one definition, shared by every stage; re-exported)

RESULT_COLUMNS = ["model", "quant", "adapter", "task", "metric", "higher_is_better", "primary", "value",
                  "stderr", "n", "baseline_value", "baseline_stderr", "delta", "recovery", "ratio",
                  "weight_bytes", "device", "key", "arm", "recovery_undefined"]
MEMORY_COLUMNS = ["model", "quant", "adapter", "total_bytes", "quantized_weight_bytes", "quant_state_bytes",
                  "unquantized_bytes", "theory_bytes", "baseline_bytes", "ratio_to_baseline", "ratio_to_theory",
                  "measured_bits_per_weight", "theory_bits_per_weight", "load_s", "eval_s", "peak_bytes", "device"]


def _group(rec: dict) -> tuple:
    """Records in one group measured the same documents the same way, so they are comparable."""
    t = rec["task"]
    return (rec["model"]["fingerprint"], t["name"], t["fingerprint"], t["limit"], t["num_fewshot"],
            rec["device"].split(":")[0], rec.get("compute_dtype"))  # a bf16 variant pairs with the bf16 baseline


MERGE_SUFFIX = {"none": "", "dequantized": "@merged-float", "requantized": "@merged-requant"}


def adapter_label(variant: dict) -> str:
    """The adapter column: the adapter's plan name, suffixed by how it was merged."""
    if not variant.get("adapter"):
        return ""
    return variant["adapter"] + MERGE_SUFFIX[variant.get("merge", "none")]


def latest(records: list[dict]) -> list[dict]:
    """The newest record per (comparable group, variant)."""
    best: dict[tuple, dict] = {}
    for r in records:
        k = _group(r) + (r["variant"]["quant"], adapter_label(r["variant"]))
        if k not in best or r["created_at"] > best[k]["created_at"]:
            best[k] = r
    return list(best.values())


def task_views(rec: dict) -> list[tuple[str, str | None, dict, str, int]]:
    """The (task, subtask, metrics, primary metric, n) views of a record: the task itself (a group:
    lm-eval's aggregate) and each member of a group as `group/subtask`."""
    out = [(rec["task"]["name"], None, rec["metrics"], rec["primary_metric"], rec["n"])]
    for sub, s in (rec.get("subtasks") or {}).items():
        out.append((f"{rec['task']['name']}/{sub}", sub, s["metrics"], s["primary_metric"], s["n"]))
    return out


def _metrics_of(rec: dict | None, subtask: str | None) -> dict:
    if rec is None:
        return {}
    if subtask is None:
        return rec["metrics"]
    return ((rec.get("subtasks") or {}).get(subtask) or {}).get("metrics", {})


def results_frame(records: list[dict]) -> pd.DataFrame:
    """One row per (record, task or subtask, metric id): filtered metrics read `metric,filter`,
    a group's members `group/subtask` in the task column."""
    recs = latest(records)
    baselines = {_group(r): r for r in recs if r["variant"]["quant"] == BASELINE and not adapter_label(r["variant"])}
    rows = []
    for r in recs:
        base = baselines.get(_group(r))
        for task, sub, metrics, primary, n in task_views(r):
            base_metrics = _metrics_of(base, sub)
            for metric, m in metrics.items():
                b = base_metrics.get(metric)
                bv = b["value"] if b else math.nan
                v = m["value"]
                hib = bool(m["higher_is_better"])
                # 1.0 = nothing lost, < 1 = worse, any metric; a score of 0 recovers 0, a baseline of 0
                # leaves recovery undefined (NaN with recovery_undefined set), which gates treat as failing
                recovery = recovery_of(v, bv, hib)
                ratio = v / bv if bv else math.nan
                rows.append({
                    "model": r["variant"]["model"], "quant": r["variant"]["quant"],
                    "adapter": adapter_label(r["variant"]), "task": task, "metric": metric, "higher_is_better": hib,
                    "primary": metric == primary, "value": v,
                    "stderr": math.nan if m["stderr"] is None else m["stderr"], "n": n,
                    "baseline_value": bv, "baseline_stderr": (b["stderr"] if b and b["stderr"] is not None else math.nan),
                    "delta": v - bv, "recovery": recovery, "ratio": ratio,
                    "recovery_undefined": recovery_undefined(v, bv, hib),
                    "weight_bytes": r["footprint"]["total_bytes"], "device": r["device"], "key": r["key"],
                    "arm": r["variant"].get("arm", r["variant"]["quant"])})
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return _sorted(frame, ["model", "task", "metric"])


def memory_frame(records: list[dict]) -> pd.DataFrame:
    """One row per variant: measured bytes split by kind, theory, ratios, and time costs."""
    recs = latest(records)
    by_variant: dict[tuple, list[dict]] = {}
    for r in recs:
        by_variant.setdefault((r["variant"]["model"], r["variant"]["quant"], adapter_label(r["variant"]),
                               r["model"]["fingerprint"], r["device"]), []).append(r)
    base_bytes = {(k[3], k[4]): rs[0]["footprint"]["total_bytes"]
                  for k, rs in by_variant.items() if k[1] == BASELINE and not k[2]}
    rows = []
    for (model, quant, adapter, fp, device), rs in by_variant.items():
        fpt = max(rs, key=lambda r: r["created_at"])["footprint"]
        base = base_bytes.get((fp, device), math.nan)
        qp = fpt["quantized_params"]
        fmt = FORMATS.get(quant) if quant in FORMATS else None
        theory_bits = math.nan
        if qp and fmt is not None and fmt.bits_per_weight is not None:
            # the quantized share of the theory bytes, per quantized weight
            theory_bits = (fpt["theory_bytes"] - fpt["unquantized_bytes"]) * 8 / qp
        rows.append({
            "model": model, "quant": quant, "adapter": adapter, "total_bytes": fpt["total_bytes"],
            "quantized_weight_bytes": fpt["quantized_weight_bytes"], "quant_state_bytes": fpt["quant_state_bytes"],
            "unquantized_bytes": fpt["unquantized_bytes"], "theory_bytes": fpt["theory_bytes"],
            "baseline_bytes": base, "ratio_to_baseline": fpt["total_bytes"] / base if base == base else math.nan,
            "ratio_to_theory": fpt["total_bytes"] / fpt["theory_bytes"],
            "measured_bits_per_weight": (fpt["quantized_weight_bytes"] + fpt["quant_state_bytes"]) * 8 / qp if qp else math.nan,
            "theory_bits_per_weight": theory_bits,
            "load_s": max(r["timings"]["load_s"] for r in rs), "eval_s": sum(r["timings"]["eval_s"] for r in rs),
            "peak_bytes": max(r["peak_bytes"] for r in rs), "device": device})
    return _sorted(pd.DataFrame(rows, columns=MEMORY_COLUMNS), ["model"])


def _sorted(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort with the baseline first, then the formats in `qeval.quant.format_order`."""
    if frame.empty:
        return frame.reset_index(drop=True)
    frame = frame.assign(_q=frame["quant"].map(format_order))
    return frame.sort_values(by + ["_q", "quant", "adapter"], kind="stable").drop(columns="_q").reset_index(drop=True)


# ----------------------------------------------------------------------------- adapters (LoRA / QLoRA)

def _good(value: float, hib: bool) -> float:
    """Orient a metric so that larger is better (perplexities are negated)."""
    return value if hib else -value


# A plan's `thresholds.min_effect` (metric name or comparison kind -> minimum meaningful effect);
# empty: every kind's default. `compare_pair` resolves it once it knows the metric's kind.
MinEffect = Mapping[str, float]


def compare_records(ref: dict, rec: dict, metric: str, samples, min_effect: MinEffect | None = None,
                    subtask: str | None = None) -> Comparison | None:
    """`compare_pair` of two stored records on `metric` (of one member of a group with `subtask`),
    by the metric's stored aggregation; None where either has no samples."""
    if samples is None:
        return None
    rs, vs = samples(ref["key"]), samples(rec["key"])
    if not rs or not vs:
        return None
    m = _metrics_of(rec, subtask)[metric]
    return compare_pair(rs, vs, metric, bool(m["higher_is_better"]), min_effect,
                        aggregation=m.get("aggregation"), task=subtask)


def adapter_frames(records: list[dict], samples=None, min_effect: MinEffect | None = None,
                   domain_tasks: Mapping[str, tuple] | None = None) -> dict[str, pd.DataFrame]:
    """What adapters win back and cost, per task's primary metric.

    `regained`: one row per adapter arm and task: the arm's score, its reference (the same format
    without adapter), what that format lost against the baseline, and the share of it the adapter
    regained = (adapted - quantized) / (baseline - quantized), oriented so that perplexity works the
    same way. Every verdict is the paired comparison (`qeval.stats.paired.compare_pair`) on the stored
    per-document outputs: `lost_verdict` (reference vs baseline; `lost_significant` when it is
    "worse": only then is `regained` meaningful), `regained_verdict` (arm vs reference) and
    `vs_baseline_verdict` (arm vs the float baseline: for arms trained on the float base, whose
    reference *is* the baseline, this is their gain). `untouched` marks tasks outside the adapter's
    training domain (the adapter's `domain_tasks`: from `domain_tasks`, the plan's adapter name ->
    tasks, when given, else as stored with the record): there `delta_vs_reference` measures forgetting.
    `merge`: each merged arm against the same adapter unmerged.
    `training`: one row per trained adapter: its costs and curves.
    """
    primary = {}
    for r in latest(records):
        m = r["metrics"][r["primary_metric"]]
        key = (_group(r), r["variant"]["quant"], adapter_label(r["variant"]))
        primary[key] = (r, m)
    regained, merges, training = [], [], {}

    def verdict(ref, rec, metric) -> tuple[str, float]:
        c = compare_records(ref, rec, metric, samples, min_effect) if ref is not None else None
        return ("undefined", math.nan) if c is None else (c.verdict, c.p_value)

    for (group, quant, label), (r, m) in primary.items():
        v = r["variant"]
        if not v.get("adapter"):
            continue
        hib = bool(m["higher_is_better"])
        metric = r["primary_metric"]
        base = primary.get((group, BASELINE, ""))
        # the reference: the arm's own format without adapter (for the float merge: the 4-bit base)
        ref = primary.get((group, quant, ""))
        spec = (r.get("adapter") or {}).get("spec", {})
        domain = (domain_tasks or {}).get(seed_base(v["adapter"]), spec.get("domain_tasks") or ())
        untouched = r["task"]["name"] not in domain
        row = {"model": v["model"], "arm": v.get("arm", label), "quant": quant, "adapter": label,
               "task": r["task"]["name"], "metric": metric, "higher_is_better": hib,
               "value": m["value"], "stderr": m["stderr"], "untouched": untouched,
               "baseline_value": base[1]["value"] if base else math.nan,
               "reference_arm": ref[0]["variant"].get("arm", quant) if ref else "",
               "reference_value": ref[1]["value"] if ref else math.nan}
        lost = regained_share = math.nan
        lost_verdict, lost_p = "undefined", math.nan
        if base and ref:
            lost = _good(base[1]["value"], hib) - _good(ref[1]["value"], hib)
            if ref[0] is base[0]:
                lost_verdict, lost_p = "within noise", 1.0  # the float base: nothing to lose or regain
            else:
                lost_verdict, lost_p = verdict(base[0], ref[0], metric)
            if lost_verdict == "worse" and lost:
                regained_share = (_good(m["value"], hib) - _good(ref[1]["value"], hib)) / lost
        reg_verdict, reg_p = verdict(ref[0] if ref else None, r, metric)
        base_verdict, base_p = verdict(base[0] if base else None, r, metric)
        row.update({"lost": lost, "lost_significant": lost_verdict == "worse", "lost_verdict": lost_verdict,
                    "lost_p": lost_p, "regained": regained_share, "regained_verdict": reg_verdict,
                    "regained_p": reg_p, "vs_baseline_verdict": base_verdict, "vs_baseline_p": base_p,
                    "float_base": quant == BASELINE,
                    "delta_vs_baseline": (m["value"] - base[1]["value"]) if base else math.nan,
                    "delta_vs_reference": (m["value"] - ref[1]["value"]) if ref else math.nan})
        regained.append(row)
        if v.get("merge", "none") != "none":
            unmerged = primary.get((group, quant, v["adapter"]))
            merges.append({"model": v["model"], "arm": row["arm"], "adapter": v["adapter"], "merge": v["merge"],
                           "task": row["task"], "metric": row["metric"], "higher_is_better": hib,
                           "unmerged_value": unmerged[1]["value"] if unmerged else math.nan,
                           "merged_value": m["value"],
                           "merge_delta": (m["value"] - unmerged[1]["value"]) if unmerged else math.nan,
                           "merge_verdict": verdict(unmerged[0] if unmerged else None, r, metric)[0],
                           "merged_bytes": r["footprint"]["total_bytes"]})
        a = r.get("adapter")
        if a and v.get("merge", "none") == "none":
            training.setdefault((v["model"], v["adapter"]), {
                "model": v["model"], "adapter": v["adapter"], "method": a["spec"]["method"],
                "train_quant": a["spec"]["train_quant"], "trainable_params": a["trainable_params"],
                "total_params": a["total_params"], "adapter_bytes": a["adapter_bytes"], "train_s": a["train_s"],
                "s_per_step": a["s_per_step"], "tokens_per_s": a["tokens_per_s"],
                "peak_train_bytes": a["peak_train_bytes"], "idle_bytes": a.get("idle_bytes", 0),
                "steps": a["spec"]["steps"], "steps_done": a.get("steps_done", a["spec"]["steps"]),
                "tokens": a.get("tokens", 0), "order_hash": a.get("order_hash", ""), "eval_s": a.get("eval_s", 0.0),
                "seed": a["spec"].get("seed"), "data_format": (a.get("data") or {}).get("format", ""),
                "data_hash": (a.get("data") or {}).get("hash", ""), "not_converged": not_converged(a["heldout"]),
                "memory": a.get("memory") or {}, "model_path": r["model"].get("path", ""),
                "batch_size": a["spec"].get("batch_size"), "seq_len": a["spec"].get("seq_len"),
                "losses": a["losses"], "heldout": a["heldout"], "key": a["key"], "device": a["device"]})
    regained = pd.DataFrame(regained)
    return {"regained": regained, "merge": pd.DataFrame(merges),
            "training": pd.DataFrame(list(training.values())), "seeds": seed_frame(regained)}


def seed_frame(regained: pd.DataFrame) -> pd.DataFrame:
    """Arms trained with several seeds (`name#s<seed>`), one row per (model, arm, task): the score's
    and the regained share's spread across seeds (`qeval.stats.paired.seed_spread`)."""
    if regained.empty:
        return pd.DataFrame()
    rows = []
    frame = regained.assign(base_arm=regained["arm"].map(seed_base))
    for (model, arm, task), g in frame.groupby(["model", "base_arm", "task"], sort=True):
        val, reg = seed_spread(list(g["value"])), seed_spread(list(g["regained"]))
        rows.append({"model": model, "arm": arm, "task": task, "metric": g["metric"].iloc[0],
                     "higher_is_better": bool(g["higher_is_better"].iloc[0]), "untouched": bool(g["untouched"].all()),
                     "seeds": len(g), "value_mean": val.mean, "value_lo": val.lo, "value_hi": val.hi,
                     "value_min": val.min, "value_max": val.max, "regained_mean": reg.mean,
                     "regained_min": reg.min, "regained_max": reg.max})
    return pd.DataFrame(rows)


def decision(frames: dict[str, pd.DataFrame], memory_budget: float | None) -> tuple[pd.DataFrame, str]:
    """LoRA vs QLoRA (vs full fine-tune): each trained adapter (one row per seed) deployed on its own
    training base, with score per task and training costs; and a one-line verdict for
    `memory_budget` bytes of peak training memory (None: name the cheapest and the best). Arms
    trained with several seeds are ranked by their mean over seeds, and the verdict says "no clear
    winner" when the best arm's interval over seeds overlaps the runner-up's."""
    reg, train = frames["regained"], frames["training"]
    if reg.empty or train.empty:
        return pd.DataFrame(), ""
    rows = []
    for t in train.itertuples(index=False):
        on_own_base = reg[(reg.adapter == t.adapter) & (reg.quant == t.train_quant)]
        if on_own_base.empty:
            continue
        d = t._asdict()
        row = {"adapter": t.adapter, "method": t.method, "train_quant": t.train_quant,
               "arm": on_own_base.arm.iloc[0], "peak_train_bytes": t.peak_train_bytes, "idle_bytes": t.idle_bytes,
               "adapter_bytes": t.adapter_bytes, "trainable_params": t.trainable_params,
               "s_per_step": t.s_per_step, "tokens_per_s": t.tokens_per_s, "train_s": t.train_s,
               "tokens": d.get("tokens", 0), "seed": d.get("seed"), "order_hash": d.get("order_hash", ""),
               "not_converged": bool(d.get("not_converged", False))}
        for x in on_own_base.itertuples(index=False):
            row[f"{x.task}:{x.metric}"] = x.value
            row[f"{x.task}:hib"] = x.higher_is_better
            row[f"{x.task}:untouched"] = x.untouched
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(["peak_train_bytes", "arm"]).reset_index(drop=True)
    by_arm, task, metric = decision_summary(table)
    if by_arm.empty:
        return table, ""
    ranked = by_arm.sort_values("mean", ascending=not bool(table[f"{task}:hib"].iloc[0]))

    def fmt(r) -> str:
        spread = (f" [{r['lo']:.4g}, {r['hi']:.4g}] over {r['seeds']} seeds" if r["seeds"] > 1 else "")
        return (f"{r['arm']} ({metric} {r['mean']:.4g}{spread}, peak training memory "
                f"{r['peak_train_bytes'] / 2**30:.2f} GiB)")

    by_memory = by_arm.sort_values("peak_train_bytes")
    cheapest = by_memory.iloc[0]
    if memory_budget is None:
        tie = ""
        if len(by_memory) > 1:  # the same rule as the score's: a difference within seed noise decides nothing
            second = by_memory.iloc[1]
            a, b = (list(table.loc[table.base_arm == r["arm"], "peak_train_bytes"].astype(float))
                    for r in (cheapest, second))
            if seeds_differ(a, b) is False:
                # a tie: named in a stable order, not by which measured a few MiB lower this time
                cheapest, second = sorted((cheapest, second), key=lambda r: r["arm"])
                tie = (f", but no clear winner on memory: {cheapest['arm']} and {second['arm']} do not differ "
                       "beyond their seed-to-seed noise (Welch t-test, 5%)")
        verdict = f"Best on {task}: {fmt(ranked.iloc[0])}; least training memory: {fmt(cheapest)}{tie}."
    else:
        fits = ranked[ranked.peak_train_bytes <= memory_budget]
        budget = f"{memory_budget / 2**30:.2f} GiB"
        if fits.empty:
            verdict = f"Nothing fits a {budget} training budget; the least memory is {fmt(cheapest)}."
        else:
            verdict = f"Within {budget} of training memory, pick {fmt(fits.iloc[0])}"
            over = ranked[ranked.peak_train_bytes > memory_budget]
            if not over.empty and over.index[0] == ranked.index[0]:
                verdict += f"; the best overall, {fmt(over.iloc[0])}, does not fit"
            verdict += "."
    if len(ranked) > 1:
        best, second = ranked.iloc[0], ranked.iloc[1]
        a, b = (list(table.loc[table.base_arm == r["arm"], f"{task}:{metric}"]) for r in (best, second))
        differ = seeds_differ(a, b)
        if differ is False:
            verdict += (f" No clear winner on {task}: {best['arm']} and {second['arm']} do not differ beyond "
                        "their seed-to-seed noise (Welch t-test, 5%).")
        elif differ is None:
            verdict += " One training per arm: training noise is not measured (set seeds: [...] to measure it)."
    unfair = [s for s, g in table.groupby("seed") if g["order_hash"].nunique() > 1 or g["tokens"].nunique() > 1]
    if unfair:
        verdict += (" Not like for like: arms with the same seed trained on different tokens "
                    "(data, seq_len, packing, batch or budget differ).")
    late = sorted({seed_base(a) for a in table.loc[table.not_converged, "arm"]})
    if late:
        verdict += f" Not converged: {', '.join(late)} (held-out loss still falling at the end: more budget may change the ranking)."
    return table.drop(columns=["base_arm"]), verdict


def decision_summary(table: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """(one row per arm over its seeds: mean, interval, spread of the first domain task's score and
    mean peak training memory; that task; its metric). Adds `base_arm` to `table`."""
    table["base_arm"] = table["arm"].map(seed_base)
    domain = [c for c in table.columns if c.endswith(":untouched") and not table[c].fillna(True).all()]
    if not domain:
        return pd.DataFrame(), "", ""
    task = domain[0].split(":")[0]
    score_col = next(c for c in table.columns if c.startswith(task + ":") and c.split(":")[1] not in ("hib", "untouched"))
    rows = []
    for arm, g in table.groupby("base_arm", sort=False):
        sp = seed_spread(list(g[score_col]))
        rows.append({"arm": arm, "seeds": sp.n, "mean": sp.mean, "lo": sp.lo, "hi": sp.hi, "min": sp.min,
                     "max": sp.max, "peak_train_bytes": float(g["peak_train_bytes"].mean()),
                     "peak_train_max": float(g["peak_train_bytes"].max())})
    return pd.DataFrame(rows), task, score_col.split(":")[1]


# ----------------------------------------------------------------------------- paired statistics

def paired_frame(records: list[dict], samples, min_effect: MinEffect | None = None) -> pd.DataFrame:
    """One row per variant and task (primary metric): the paired comparison against the baseline
    (`qeval.stats.paired.compare_pair`: test, interval, p-value, flips, MDE, verdict).
    `samples(key)` returns a record's stored per-sample outputs."""
    recs = latest(records)
    baselines = {_group(r): r for r in recs if r["variant"]["quant"] == BASELINE and not adapter_label(r["variant"])}
    rows = []
    for r in recs:
        base = baselines.get(_group(r))
        if base is None or base is r:
            continue
        for task, sub, metrics, metric, _ in task_views(r):
            if sub is not None and (r["subtasks"][sub].get("group") or metric not in _metrics_of(base, sub)):
                continue  # a nested group's documents are its leaves' (compared there and in the top group)
            c = compare_records(base, r, metric, samples, min_effect, sub)
            if c is None or (sub is not None and not c.n):
                continue
            rows.append({"model": r["variant"]["model"], "quant": r["variant"]["quant"],
                         "adapter": adapter_label(r["variant"]), "task": task, "metric": metric,
                         "delta": c.delta, "kind": c.kind, **c.as_row()})
    return pd.DataFrame(rows)


def task_mde(pairs: pd.DataFrame) -> pd.DataFrame:
    """Per task: n and the minimum detectable effect of its test at that n (alpha 0.05, power 0.8).

    Measured on the variant closest to the baseline -- the noise of a numerically different but
    equivalent computation, which is what separates two nightly runs: right/wrong tasks get the
    exact McNemar MDE at the lowest flip rate any variant shows against the baseline, perplexities
    the smallest t-test MDE (the smallest per-document spread) of any variant."""
    from qeval.stats.paired import mcnemar_mde

    if pairs.empty:
        return pd.DataFrame(columns=["task", "metric", "n", "mde", "min_effect", "test", "kind", "flip_rate"])
    out = []
    for (task, metric), g in pairs.groupby(["task", "metric"], sort=True):
        n = int(g["pairs"].max())
        rates = g["flip_rate"].dropna()
        rates = rates[rates > 0]
        if g["kind"].iloc[0] == "right_wrong":
            rate = float(rates.min()) if len(rates) else 0.0
            mde = mcnemar_mde(n, round(rate, 4))
        else:
            rate, mde = math.nan, float(g["mde"].min())
        out.append({"task": task, "metric": metric, "n": n, "mde": mde, "min_effect": float(g["min_effect"].iloc[0]),
                    "test": g["test"].iloc[0], "kind": g["kind"].iloc[0], "flip_rate": rate})
    return pd.DataFrame(out)


def divergence_frame(records: list[dict], pairs: pd.DataFrame) -> pd.DataFrame:
    """Per variant: KL / top-1 agreement on the divergence task beside flips and McNemar p of each
    right/wrong task (the CSV a user reads to see damage that accuracy hides)."""
    rows = []
    recs = latest(records)
    for r in recs:
        d = r.get("divergence") or {}
        if "kl_mean" not in d:
            continue
        row = {"model": r["variant"]["model"], "quant": r["variant"]["quant"], "adapter": adapter_label(r["variant"]),
               "divergence_task": r["task"]["name"], "tokens": d["tokens"], "kl_mean": d["kl_mean"],
               "kl_p90": d["kl_p90"], "kl_p99": d["kl_p99"], "kl_max": d["kl_max"], "top1_agree": d["top1_agree"],
               "ppl_ratio": d["ppl_ratio"], "divergence_s": d["seconds"]}
        mine = pairs[(pairs.model == row["model"]) & (pairs.quant == row["quant"]) & (pairs.adapter == row["adapter"])] \
            if not pairs.empty else pairs
        flip_rows = mine[mine["flips"].notna()] if "flips" in mine.columns else mine.iloc[0:0]
        if flip_rows.empty:
            rows.append({**row, "task": "", "flips": math.nan, "mcnemar_p": math.nan})
        for f in flip_rows.itertuples(index=False):
            rows.append({**row, "task": f.task, "flips": int(f.flips), "flips_right_to_wrong": int(f.flips_right_to_wrong),
                         "flips_wrong_to_right": int(f.flips_wrong_to_right), "flip_rate": f.flip_rate,
                         "mcnemar_p": f.mcnemar_p, "delta": f.delta, "delta_lo": f.delta_lo, "delta_hi": f.delta_hi,
                         "verdict": f.verdict})
    return _sorted(pd.DataFrame(rows), ["model"]) if rows else pd.DataFrame(
        columns=["model", "quant", "adapter", "kl_mean", "kl_p99", "top1_agree", "flips", "mcnemar_p"])


def with_paired(results: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    """The results frame with the paired comparison (interval, p, verdict, MDE, flips) on each primary row."""
    cols = ["test", "delta_lo", "delta_hi", "p_value", "significant", "meaningful", "verdict", "mde", "min_effect",
            "flips", "mcnemar_p"]
    if pairs.empty:
        return results.assign(**{c: math.nan for c in cols})
    keep = pairs[["model", "quant", "adapter", "task", "metric"] + [c for c in cols if c in pairs.columns]]
    return results.merge(keep, on=["model", "quant", "adapter", "task", "metric"], how="left")


# ----------------------------------------------------------------------------- nightly history

def history_frame(runs: list[dict], get) -> pd.DataFrame:
    """One row per finished nightly run, variant and task (primary metric), in run order, with a
    flag where library versions changed since the previous run. `get(key)` returns a record."""
    rows, prev_versions = [], None
    for run in runs:
        if run["status"] not in ("ok", "regression"):
            continue
        changed = "" if prev_versions is None else ", ".join(
            f"{k} {prev_versions.get(k)} -> {v}" for k, v in run["versions"].items() if prev_versions.get(k) != v)
        prev_versions = run["versions"]
        for key in run["cells"]:
            rec = get(key)
            if rec is None:
                continue
            metric = rec["primary_metric"]
            rows.append({"run_id": run["run_id"], "started_at": run["started_at"], "git_sha": run["git_sha"],
                         "versions_changed": changed, "model": rec["variant"]["model"],
                         "arm": rec["variant"].get("arm", rec["variant"]["quant"]), "variant_id": rec["variant_id"],
                         "task": rec["task"]["name"], "metric": metric, "value": rec["metrics"][metric]["value"],
                         "stderr": rec["metrics"][metric]["stderr"], "computed": key in run.get("computed", []),
                         "key": key})
    return pd.DataFrame(rows)
