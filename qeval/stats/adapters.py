"""Stage: what adapters (LoRA / QLoRA / full fine-tune) win back and cost, from stored records: the
regained / merge / training / seed frames, and the LoRA-vs-QLoRA decision.

The adapter spec's helpers (qeval.train.spec: `seed_base`, `not_converged`) are imported where
used: that module imports torch today, and the frames must not.
"""
from __future__ import annotations

import math
from typing import Mapping

import pandas as pd

from qeval.stats.records import BASELINE, MinEffect, compare_records, latest, record_group
from qeval.stats.seeds import seed_spread, seeds_differ
from qeval.store.record import Record


def _good(value: float, hib: bool) -> float:
    """Orient a metric so that larger is better (perplexities are negated)."""
    return value if hib else -value


def adapter_frames(records: list[Record], samples=None, min_effect: MinEffect | None = None,
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
    from qeval.train.spec import not_converged, seed_base

    primary = {}
    for r in latest(records):
        m = r.metrics[r.primary_metric]
        key = (record_group(r), r.variant.quant, r.variant.adapter_label)
        primary[key] = (r, m)
    regained, merges, training = [], [], {}

    def verdict(ref, rec, metric) -> tuple[str, float]:
        c = compare_records(ref, rec, metric, samples, min_effect) if ref is not None else None
        return ("undefined", math.nan) if c is None else (c.verdict, c.p_value)

    for (group, quant, label), (r, m) in primary.items():
        v = r.variant
        if not v.adapter:
            continue
        hib = bool(m.higher_is_better)
        metric = r.primary_metric
        base = primary.get((group, BASELINE, ""))
        # the reference: the arm's own format without adapter (for the float merge: the 4-bit base)
        ref = primary.get((group, quant, ""))
        spec = r.adapter.spec if r.adapter is not None else {}
        domain = (domain_tasks or {}).get(seed_base(v.adapter), spec.get("domain_tasks") or ())
        untouched = r.task.name not in domain
        # an arm stored before arms were named is labelled by its adapter here (by its format elsewhere)
        row = {"model": v.model, "arm": v.arm if v.stored("arm") else label, "quant": quant, "adapter": label,
               "task": r.task.name, "metric": metric, "higher_is_better": hib,
               "value": m.value, "stderr": m.stderr, "untouched": untouched,
               "baseline_value": base[1].value if base else math.nan,
               "reference_arm": ref[0].variant.arm if ref else "",
               "reference_value": ref[1].value if ref else math.nan}
        lost = regained_share = math.nan
        lost_verdict, lost_p = "undefined", math.nan
        if base and ref:
            lost = _good(base[1].value, hib) - _good(ref[1].value, hib)
            if ref[0] is base[0]:
                lost_verdict, lost_p = "within noise", 1.0  # the float base: nothing to lose or regain
            else:
                lost_verdict, lost_p = verdict(base[0], ref[0], metric)
            if lost_verdict == "worse" and lost:
                regained_share = (_good(m.value, hib) - _good(ref[1].value, hib)) / lost
        reg_verdict, reg_p = verdict(ref[0] if ref else None, r, metric)
        base_verdict, base_p = verdict(base[0] if base else None, r, metric)
        row.update({"lost": lost, "lost_significant": lost_verdict == "worse", "lost_verdict": lost_verdict,
                    "lost_p": lost_p, "regained": regained_share, "regained_verdict": reg_verdict,
                    "regained_p": reg_p, "vs_baseline_verdict": base_verdict, "vs_baseline_p": base_p,
                    "float_base": quant == BASELINE,
                    "delta_vs_baseline": (m.value - base[1].value) if base else math.nan,
                    "delta_vs_reference": (m.value - ref[1].value) if ref else math.nan})
        regained.append(row)
        if v.merge != "none":
            unmerged = primary.get((group, quant, v.adapter))
            merges.append({"model": v.model, "arm": row["arm"], "adapter": v.adapter, "merge": v.merge,
                           "task": row["task"], "metric": row["metric"], "higher_is_better": hib,
                           "unmerged_value": unmerged[1].value if unmerged else math.nan,
                           "merged_value": m.value,
                           "merge_delta": (m.value - unmerged[1].value) if unmerged else math.nan,
                           "merge_verdict": verdict(unmerged[0] if unmerged else None, r, metric)[0],
                           "merged_bytes": r.footprint.total_bytes})
        a = r.adapter
        if a is not None and v.merge == "none":
            data = a.data or {}
            training.setdefault((v.model, v.adapter), {
                "model": v.model, "adapter": v.adapter, "method": a.spec["method"],
                "train_quant": a.spec["train_quant"], "trainable_params": a.trainable_params,
                "total_params": a.total_params, "adapter_bytes": a.adapter_bytes, "train_s": a.train_s,
                "s_per_step": a.s_per_step, "tokens_per_s": a.tokens_per_s,
                "peak_train_bytes": a.peak_train_bytes, "idle_bytes": a.idle_bytes,
                "steps": a.spec["steps"], "steps_done": a.steps_done,
                "tokens": a.tokens, "order_hash": a.order_hash, "eval_s": a.eval_s,
                "seed": a.spec.get("seed"), "data_format": data.get("format", ""),
                "data_hash": data.get("hash", ""), "not_converged": not_converged(a.heldout),
                "memory": a.memory or {}, "model_path": r.model.path,
                "batch_size": a.spec.get("batch_size"), "seq_len": a.spec.get("seq_len"),
                "losses": a.losses, "heldout": a.heldout, "key": a.key, "device": a.device})
    regained = pd.DataFrame(regained)
    return {"regained": regained, "merge": pd.DataFrame(merges),
            "training": pd.DataFrame(list(training.values())), "seeds": seed_frame(regained)}


def seed_frame(regained: pd.DataFrame) -> pd.DataFrame:
    """Arms trained with several seeds (`name#s<seed>`), one row per (model, arm, task): the score's
    and the regained share's spread across seeds (`qeval.stats.paired.seed_spread`)."""
    from qeval.train.spec import seed_base

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
    from qeval.train.spec import seed_base

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
               "not_converged": bool(d.get("not_converged", False)),
               "options": str((d.get("memory") or {}).get("options") or "")}
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
    verdict += memory_options_note(table)
    unfair = [s for s, g in table.groupby("seed") if g["order_hash"].nunique() > 1 or g["tokens"].nunique() > 1]
    if unfair:
        verdict += (" Not like for like: arms with the same seed trained on different tokens "
                    "(data, seq_len, packing, batch or budget differ).")
    late = sorted({seed_base(a) for a in table.loc[table.not_converged, "arm"]})
    if late:
        verdict += f" Not converged: {', '.join(late)} (held-out loss still falling at the end: more budget may change the ranking)."
    return table.drop(columns=["base_arm"]), verdict


def memory_options_note(table: pd.DataFrame) -> str:
    """Which trainer memory options (checkpointing, cross-entropy, offloading, optimizer) the peaks
    were measured with: one setting for every arm is named; arms measured with different ones make
    the memory verdict unfair, and that is said (`gradient_checkpointing: auto` may resolve differently per arm)."""
    options = {a: o for a, o in zip(table["arm"], table["options"]) if o} if "options" in table else {}
    if not options:
        return ""  # records from before the options were stored
    if len(set(options.values())) == 1:
        return f" Training memory measured with {next(iter(options.values()))} for every arm."
    listed = "; ".join(f"{a}: {o}" for a, o in sorted(options.items()))
    return (f" Not like for like on memory: the arms trained with different memory options ({listed}); "
            "set gradient_checkpointing, cross_entropy, optimizer and offload_activations the same on every adapter.")


def decision_summary(table: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    """(one row per arm over its seeds: mean, interval, spread of the first domain task's score and
    mean peak training memory; that task; its metric). Adds `base_arm` to `table`."""
    from qeval.train.spec import seed_base

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


