"""`qeval bench`: speed and memory of each format, against stated targets, as a table.

Timings belong here, not in tests (a loaded CI machine would make timed tests flaky). Per format:
load + quantize time, measured bytes vs theory, prefill throughput (one 256-token sequence, median
of 3 after a warm-up), greedy decode throughput (32 new tokens), and peak memory of the whole step.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import pandas as pd

from qeval.core import env
from qeval.core.files import atomic_write
from qeval.models.memory import PeakMemory
from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS

# What we hold each format to. ratio_to_theory: measured bytes / the format's arithmetic;
# prefill_vs_none: how much slower than the full-precision baseline a format may be.
TARGETS = {"ratio_to_theory": 1.01, "load_s": 15.0, "prefill_vs_none": 3.0}
PREFILL_TOKENS, DECODE_TOKENS, REPEATS = 256, 32, 3


def bench(model_spec: str, formats: list[str], device: str) -> pd.DataFrame:
    import torch

    resolved = resolve_model(model_spec)
    rows = []
    for name in formats:
        with PeakMemory(device) as peak:
            lm = load_model(resolved, FORMATS.get(name), device)
            vocab = lm.model.config.vocab_size
            ids = torch.randint(min(100, vocab // 2), min(10_000, vocab), (1, PREFILL_TOKENS),
                                generator=torch.Generator().manual_seed(0)).to(device)
            with torch.no_grad():
                lm.model(ids[:, :16])  # warm-up (kernel selection, first-call allocations)
                times = []
                for _ in range(REPEATS):
                    t0 = time.perf_counter()
                    lm.model(ids)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                lm.model.generate(ids[:, :32], max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS,
                                  do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
                decode_s = time.perf_counter() - t0
        fp = lm.footprint
        rows.append({"format": name, "bytes": fp.total_bytes, "theory_bytes": fp.theory_bytes,
                     "ratio_to_theory": fp.total_bytes / fp.theory_bytes, "load_s": lm.load_s,
                     "prefill_tok_s": PREFILL_TOKENS / statistics.median(times), "decode_tok_s": DECODE_TOKENS / decode_s,
                     "peak_bytes": peak.peak_bytes, "device": device})
        del lm
    frame = pd.DataFrame(rows)
    base = frame.loc[frame.format == "none", "prefill_tok_s"]
    frame["prefill_vs_none"] = (float(base.iloc[0]) / frame["prefill_tok_s"]) if len(base) else float("nan")
    frame["meets_targets"] = ((frame.ratio_to_theory <= TARGETS["ratio_to_theory"]) & (frame.load_s <= TARGETS["load_s"])
                              & ~(frame.prefill_vs_none > TARGETS["prefill_vs_none"]))
    return frame


def write(frame: pd.DataFrame, out: Path, meta: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# qeval bench\n\n{meta}\n",
             "Targets: measured/theory bytes <= {ratio_to_theory}, load <= {load_s} s, prefill at most "
             "{prefill_vs_none}x slower than the baseline.\n".format(**TARGETS),
             "| format | MiB | theory MiB | ratio | load s | prefill tok/s | x slower than none | decode tok/s | peak MiB | targets |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.format} | {r.bytes / 2**20:.1f} | {r.theory_bytes / 2**20:.1f} | {r.ratio_to_theory:.4f} | "
                     f"{r.load_s:.2f} | {r.prefill_tok_s:.0f} | {r.prefill_vs_none:.2f} | {r.decode_tok_s:.1f} | "
                     f"{r.peak_bytes / 2**20:.0f} | {'met' if r.meets_targets else 'MISSED'} |")
    atomic_write(out / "bench.md", "\n".join(lines) + "\n")
    atomic_write(out / "bench.csv", frame.to_csv(index=False))
    return [out / "bench.md", out / "bench.csv"]


# --- harness efficiency: qeval's evaluation against a bare model on the same windows -------------

# Targets of issue 14, judged here and never in tests: qeval's evaluation at >= 90% of a bare forward
# over the same token windows and batching; the default matrix >= 4x faster in one qeval process than
# in one fresh lm-eval process per cell.
EFFICIENCY_TARGET, PER_CELL_TARGET = 0.9, 4.0


def _replay(loaded, recorded: list) -> tuple[float, int]:
    """Seconds a bare model takes for the recorded forwards (full logits + log-softmax, what a plain
    HF scoring loop does) and generate calls (same batches, stops and lengths); tokens processed."""
    import torch
    import torch.nn.functional as F
    from lm_eval.models.utils_hf import stop_sequences_criteria

    model, tok = loaded.model, loaded.tokenizer
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for item in recorded:
            if item[0] == "forward":
                _, batch, inplens, *extra = item  # extra: the tree rows' mask and positions
                F.log_softmax(model(batch, **(extra[0] if extra else {})).logits, dim=-1)
                tokens += sum(inplens)
            else:
                _, ctx, mask, max_length, stop = item
                out = model.generate(input_ids=ctx, attention_mask=mask, max_length=max_length, do_sample=False,
                                     stopping_criteria=stop_sequences_criteria(tok, stop, ctx.shape[1], ctx.shape[0]),
                                     pad_token_id=tok.pad_token_id, use_cache=True)
                tokens += int(mask.sum()) if mask is not None else ctx.numel()
                tokens += (out.shape[1] - ctx.shape[1]) * ctx.shape[0]
    if loaded.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def scaled_tasks(suite_name: str, scale: float):
    import dataclasses

    from qeval.eval.suites import load_suite

    return [dataclasses.replace(t, limit=max(2, round((t.limit or 50) * scale))) for t in load_suite(suite_name).tasks]


def efficiency(model_spec: str, formats: list[str], device: str, suite: str = "default",
               scale: float = 0.25, noise: bool = True, dtype=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per task x format: qeval's tokens/s (the whole `evaluate()` call: lm-eval's task building,
    requests, scoring, metrics) and a bare model's over the recorded windows; their ratio is the
    harness efficiency. With `noise`, also each log-likelihood task at batch size 1 vs the suite's
    batch size: how much batching moves the numbers (the batch-size noise floor)."""
    import dataclasses

    import qeval.eval.lm
    from qeval.eval.evaluate import EvalSpec, evaluate

    resolved = resolve_model(model_spec)
    tasks = scaled_tasks(suite, scale)
    spec = EvalSpec()
    rows, noise_rows, refs = [], [], {}
    for name in formats:
        loaded = load_model(resolved, FORMATS.get(name), device, dtype)
        if name == formats[0]:
            # warm-up: the process's first evaluate() pays one-time costs (lm-eval's imports and task
            # index, first-call kernel selection) that are no task type's efficiency
            evaluate(loaded, dataclasses.replace(tasks[0], limit=2, divergence=False), spec)
        for t in tasks:
            div = (refs.get(t.task, "reference") if t.divergence else None)
            rec: list = []
            out = evaluate(loaded, t, spec, div, recorder=rec)
            if out.reference is not None:
                refs[t.task] = out.reference
            bare_s, tokens = _replay(loaded, rec)
            rows.append({"task": t.task, "type": out.config.get("output_type", "?"), "format": name,
                         "batch_size": t.batch_size, "n": out.n, "tokens": tokens,
                         "qeval_tok_s": tokens / out.eval_s, "bare_tok_s": tokens / bare_s,
                         "efficiency": bare_s / out.eval_s, "divergence": bool(t.divergence),
                         "divergence_s": out.divergence_s, "eval_s": out.eval_s, "device": device,
                         "dtype": loaded.dtype})
            # every format: LLM.int8 picks its outlier columns per batch (padding included), so
            # batching moves its numbers by more than float rounding
            if noise and out.config.get("output_type") != "generate_until":
                # against lm-eval's layout: one request per row, one row per forward (no shared
                # context rows, no padding)
                with qeval.eval.lm.rows_only():
                    one = evaluate(loaded, dataclasses.replace(t, batch_size=1, divergence=False), spec)
                noise_rows.append({"format": name, **_batch_noise(t, out, one)})
        del loaded
    frame = pd.DataFrame(rows)
    frame["meets_target"] = frame.efficiency >= EFFICIENCY_TARGET
    return frame, pd.DataFrame(noise_rows)


def dtype_floor(model_spec: str, device: str, dtype, suite: str = "default", scale: float = 1.0,
                task: str = "qeval_lee_ppl", reference_dtype=None) -> dict:
    """What computing in `dtype` instead of `reference_dtype` (default float32) moves by itself: the
    baseline (format none) in `dtype` against a reference recorded by the baseline in
    `reference_dtype`, on the divergence task: the KL / top-1 floor under every format's numbers in
    that dtype, and the primary metric and speed of both. Also the `dtype` baseline against its own
    reference, which must be exactly 0 (the reference's logits are recomputed in its dtype)."""
    import dataclasses

    import torch

    from qeval.eval.evaluate import EvalSpec, evaluate

    resolved = resolve_model(model_spec)
    t = next((dataclasses.replace(x, divergence=True) for x in scaled_tasks(suite, scale) if x.task == task), None)
    if t is None:
        raise ValueError(f"{task} is not in suite {suite}")
    spec, none = EvalSpec(bootstrap_iters=100), FORMATS.get("none")  # stderr is not what is measured here
    ref_dtype = reference_dtype or torch.float32
    ref_out = evaluate(load_model(resolved, none, device, ref_dtype), t, spec, "reference")
    low = load_model(resolved, none, device, dtype)
    low_out = evaluate(low, t, spec, ref_out.reference)
    self_out = evaluate(load_model(resolved, none, device, dtype), t, spec, "reference")
    again = evaluate(low, t, spec, self_out.reference).divergence
    d = low_out.divergence
    return {"task": t.task, "n": low_out.n, "tokens": d.tokens, "device": device,
            "dtype": low.dtype, "reference_dtype": str(ref_dtype).removeprefix("torch."),
            "kl_mean": d.kl_mean, "kl_p99": d.kl_p99, "kl_max": d.kl_max, "top1_agree": d.top1_agree,
            "ppl_ratio": d.ppl_ratio, "primary": low_out.primary,
            "primary_reference": ref_out.metrics[ref_out.primary].value,
            "primary_dtype": low_out.metrics[low_out.primary].value,
            "eval_s_reference": ref_out.eval_s, "eval_s_dtype": low_out.eval_s, "self_kl_max": again.kl_max}


def write_dtype_floor(row: dict) -> str:
    return ("\n## Compute-dtype noise floor\n\n"
            f"The baseline computed in {row['dtype']} against the same baseline in {row['reference_dtype']} on "
            f"{row['task']} ({row['n']} documents, {row['tokens']} tokens, {row['device']}): what the compute "
            f"dtype moves by itself, under every format's numbers in that dtype.\n\n"
            "| KL mean | KL p99 | KL max | top-1 agreement | token ppl ratio | "
            f"{row['primary']} {row['reference_dtype']} | {row['primary']} {row['dtype']} | "
            f"eval s {row['reference_dtype']} | eval s {row['dtype']} | {row['dtype']} vs itself (KL max) |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            f"| {row['kl_mean']:.2e} | {row['kl_p99']:.2e} | {row['kl_max']:.2e} | {row['top1_agree']:.4f} | "
            f"{row['ppl_ratio']:.4f} | {row['primary_reference']:.4g} | {row['primary_dtype']:.4g} | "
            f"{row['eval_s_reference']:.1f} | {row['eval_s_dtype']:.1f} | {row['self_kl_max']:.1e} |\n")


def _batch_noise(t, batched, single) -> dict:
    """Largest per-sample log-likelihood difference and metric differences, batch N vs 1."""
    import numpy as np

    a = [x for s in single.samples for x in s["resps"] if isinstance(x, float)]
    b = [x for s in batched.samples for x in s["resps"] if isinstance(x, float)]
    d = np.abs(np.asarray(a) - np.asarray(b)) if a and len(a) == len(b) else np.asarray([np.nan])
    rel = d / np.maximum(np.abs(np.asarray(a)), 1e-12) if a and len(a) == len(b) else d
    deltas = {m: abs(batched.metrics[m].value - single.metrics[m].value) for m in batched.metrics}
    return {"task": t.task, "batch_size": t.batch_size, "max_abs_dll": float(d.max()), "max_rel_dll": float(rel.max()),
            "primary": batched.primary, "primary_delta": deltas[batched.primary],
            "primary_stderr": batched.metrics[batched.primary].stderr, "max_metric_delta": max(deltas.values())}


def per_cell(model_spec: str, formats: list[str], suite: str = "default", scale: float = 0.25,
             timeout_s: float = 600) -> dict:
    """The same cells (formats x tasks) two ways, wall-clock: one fresh process per cell running
    lm-eval the usual way (scripts/lm_eval_cell.py: import, load + quantize, index tasks, evaluate),
    and qeval's one in-process `run_plan` into a fresh store (loads included, training not involved)."""
    import os
    import subprocess
    import sys
    import tempfile

    import yaml

    from qeval.run.driver import run_plan
    from qeval.run.plan import Plan
    from qeval.eval.suites import TASKS_DIR

    resolved = resolve_model(model_spec)
    tasks = scaled_tasks(suite, scale)
    # a checkout's script (the per-cell comparison is a benchmark of the repository, not of an install)
    script = env.PACKAGE_ROOT.parent / "scripts" / "lm_eval_cell.py"
    cells, t0 = [], time.perf_counter()
    for name in formats:
        for t in tasks:
            c0 = time.perf_counter()
            bs = 1 if t.task == "qeval_lee_ppl" else t.batch_size  # the usual way: lm-eval's defaults per type
            proc = subprocess.run([sys.executable, str(script), str(resolved.path), name, t.task, str(t.limit),
                                   str(t.num_fewshot), str(bs), str(TASKS_DIR)],
                                  capture_output=True, text=True, timeout=timeout_s, env={**os.environ})
            if proc.returncode != 0:
                raise RuntimeError(f"lm_eval_cell {name} {t.task}: {proc.stderr.strip().splitlines()[-1:]}")
            cells.append({"format": name, "task": t.task, "s": time.perf_counter() - c0})
    fresh_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        suite_path = Path(tmp) / "bench-suite.yaml"
        suite_path.write_text(yaml.safe_dump({"name": "bench", "tasks": [
            {"task": t.task, "limit": t.limit, "num_fewshot": t.num_fewshot, "batch_size": t.batch_size,
             "divergence": t.divergence} for t in tasks]}))
        plan = Plan(models=(model_spec,), formats=tuple(formats), suite=str(suite_path), device="cpu")
        t0 = time.perf_counter()
        summary = run_plan(plan, Path(tmp) / "s.sqlite", progress=lambda s: None)
        qeval_s = time.perf_counter() - t0
    return {"cells": len(cells), "fresh_process_s": fresh_s, "qeval_s": qeval_s, "speedup": fresh_s / qeval_s,
            "failed": len(summary.failed), "per_cell": cells}


def write_efficiency(frame: pd.DataFrame, noise: pd.DataFrame, cells: dict | None, out: Path) -> str:
    lines = ["\n## Harness efficiency\n",
             f"qeval's `evaluate()` (lm-eval task building, requests, scoring, metrics) against a bare model "
             f"(full logits + log-softmax, or `generate`) over the same recorded windows and batches. "
             f"Target: efficiency >= {EFFICIENCY_TARGET}. Above 1 means qeval does less work than the bare "
             f"forward (head only on the positions read). For a task with KL: of qeval's seconds, those in the "
             f"divergence hooks (the baseline recording its reference, or a variant's KL + reference reads; "
             f"the bare forward does neither).\n",
             "| task | type | format | batch | docs | tokens | qeval tok/s | bare tok/s | efficiency | qeval s | "
             "of which KL s | target |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.task}{' (+KL)' if r.divergence else ''} | {r.type} | {r.format} | {r.batch_size} | {r.n} | "
                     f"{r.tokens} | {r.qeval_tok_s:.0f} | {r.bare_tok_s:.0f} | {r.efficiency:.2f} | {r.eval_s:.1f} | "
                     f"{f'{r.divergence_s:.1f}' if r.divergence else '-'} | {'met' if r.meets_target else 'MISSED'} |")
    if len(noise):
        lines += ["\n### Batch-size noise floor\n",
                  "Each log-likelihood task as qeval scores it (its batch size; a multiple-choice question's "
                  "choices in one row) vs lm-eval's layout (one request per row, batch size 1): padding and "
                  "packing change GEMM shapes, so float rounding (and for LLM.int8 which columns count as "
                  "outliers: it decides per batch). Largest per-sample log-likelihood difference and the metric change, beside the metric's own standard error.\n",
                  "| task | format | batch | max abs d(loglik) | max rel d(loglik) | primary | d(primary) | stderr | "
                  "max d(any metric) |",
                  "|---|---|---:|---:|---:|---|---:|---:|---:|"]
        for r in noise.itertuples(index=False):
            lines.append(f"| {r.task} | {r.format} | {r.batch_size} | {r.max_abs_dll:.2e} | {r.max_rel_dll:.2e} | {r.primary} | "
                         f"{r.primary_delta:.2e} | {r.primary_stderr or float('nan'):.3g} | {r.max_metric_delta:.2e} |")
    if cells:
        ok = cells["speedup"] >= PER_CELL_TARGET
        lines += ["\n## One qeval run vs one fresh lm-eval process per cell\n",
                  f"{cells['cells']} cells (formats x tasks above, same limits). Fresh process per cell "
                  f"(`scripts/lm_eval_cell.py`: import, load + quantize, index tasks, evaluate): "
                  f"{cells['fresh_process_s']:.1f} s; qeval `run_plan` in one process, fresh store, loads "
                  f"included: {cells['qeval_s']:.1f} s; speedup {cells['speedup']:.2f}x "
                  f"(target >= {PER_CELL_TARGET}x: {'met' if ok else 'MISSED'}).\n"]
    text = "\n".join(lines) + "\n"
    frame.to_csv(out / "efficiency.csv", index=False)
    if len(noise):
        noise.to_csv(out / "batch_noise.csv", index=False)
    return text
