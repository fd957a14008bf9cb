"""Tests for qeval.report (build.render and the sections): every file is written, tables show the frame's numbers, edge cases render."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from qeval.report import build, fmt, frames

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = ["results.csv", "memory.csv", "recovery.png", "memory_vs_score.png", "report.md", "report.html"]
REQUIRED = ["model", "quant", "adapter", "task", "metric", "value", "stderr", "n", "baseline_value", "delta",
            "recovery", "weight_bytes"]
MODEL = "smollm2-135m"
MIB = 2 ** 20

# (task, metric, higher_is_better, primary) -> value per quant; stderr is NaN for the byte metric.
METRICS = {
    ("qeval_analogy", "acc", True, True): {"none": 0.50, "bnb-int8": 0.49, "bnb-nf4": 0.45},
    ("qeval_analogy", "acc_norm", True, False): {"none": 0.52, "bnb-int8": 0.515, "bnb-nf4": 0.47},
    ("qeval_lee_ppl", "word_perplexity", False, True): {"none": 20.0, "bnb-int8": 20.2, "bnb-nf4": 27.0},
    ("qeval_lee_ppl", "byte_perplexity", False, False): {"none": 1.8, "bnb-int8": 1.81, "bnb-nf4": 1.95},
}
TOTAL = {"none": 270 * MIB, "bnb-int8": 162 * MIB, "bnb-nf4": 110 * MIB}
BITS = {"none": (math.nan, math.nan), "bnb-int8": (8.1, 8.0), "bnb-nf4": (4.6, 4.5)}


def make_results(with_baseline: bool = True) -> pd.DataFrame:
    """The frame the store module derives, built by hand with the documented column semantics."""
    rows = []
    for (task, metric, hib, primary), values in METRICS.items():
        base = values["none"] if with_baseline else math.nan
        for quant, value in values.items():
            if quant == "none" and not with_baseline:
                continue
            rows.append(dict(
                model=MODEL, quant=quant, adapter="", task=task, metric=metric, higher_is_better=hib,
                primary=primary, value=value, stderr=math.nan if metric == "byte_perplexity" else 0.02,
                n=100, baseline_value=base, baseline_stderr=0.02 if with_baseline else math.nan,
                delta=value - base, recovery=(value / base) if hib else (base / value), ratio=value / base,
                weight_bytes=TOTAL[quant], device="cpu", key=f"k-{task}-{metric}-{quant}"))
    # Deliberately unsorted: render sorts with the baseline first.
    return pd.DataFrame(rows[::-1])


def make_memory(with_baseline: bool = True) -> pd.DataFrame:
    rows = []
    for quant, total in TOTAL.items():
        if quant == "none" and not with_baseline:
            continue
        base = TOTAL["none"] if with_baseline else math.nan
        rows.append(dict(
            model=MODEL, quant=quant, adapter="", total_bytes=total, quantized_weight_bytes=total - 40 * MIB,
            quant_state_bytes=0 if quant == "none" else 3 * MIB, unquantized_bytes=40 * MIB,
            theory_bytes=total - MIB, baseline_bytes=base, ratio_to_baseline=total / base,
            ratio_to_theory=total / (total - MIB), measured_bits_per_weight=BITS[quant][0],
            theory_bits_per_weight=BITS[quant][1], load_s=1.25, eval_s=12.5, peak_bytes=total + 10 * MIB,
            device="cpu"))
    return pd.DataFrame(rows)


META = {
    "title": "qeval test report", "generated_at": "2024-01-01T00:00:00Z", "store": "results/qeval.sqlite",
    "models": {MODEL: "0123456789abcdef0123456789abcdef"}, "versions": {"torch": "2.5.1", "pandas": "3.1"},
    "git_sha": "deadbeefcafe", "devices": ["cpu"], "suite": "smoke", "seed": 1234, "cells": 3,
}


def table_line(md: str, task: str, label: str) -> str:
    """The row for `label` in the first table after the task's heading (its primary-metric table)."""
    section = md[md.index(f"### {task}"):]
    return next(line for line in section.splitlines() if line.startswith(f"| {label} |"))


@pytest.fixture
def rendered(tmp_path):
    results, memory = make_results(), make_memory()
    paths = build.render(results, memory, META, tmp_path / "out")
    return results, tmp_path / "out", paths


def test_all_files_written_atomically(rendered):
    _, out, paths = rendered
    assert [p.name for p in paths] == FILES
    assert all(p.parent == out and p.is_file() for p in paths)
    # No temporary files are left behind by the write-then-rename.
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


def test_results_csv_round_trips(rendered):
    results, out, _ = rendered
    back = pd.read_csv(out / "results.csv", keep_default_na=True)
    assert list(back.columns) == frames.RESULT_COLUMNS
    assert set(REQUIRED) <= set(back.columns)
    assert len(back) == len(results)
    # Sorted by model, task, metric, then quant with the baseline first.
    first = back[(back.task == "qeval_analogy") & (back.metric == "acc")]
    assert list(first.quant) == ["none", "bnb-int8", "bnb-nf4"]
    merged = back.merge(results, on=["quant", "task", "metric"], suffixes=("", "_orig"))
    assert (merged["value"] - merged["value_orig"]).abs().max() < 1e-12
    assert len(pd.read_csv(out / "memory.csv")) == 3


def test_markdown_content(rendered):
    results, out, _ = rendered
    md = (out / "report.md").read_text(encoding="utf-8")
    for label in ("none", "bnb-int8", "bnb-nf4"):
        assert f"| {label} |" in md
    for task in ("qeval_analogy", "qeval_lee_ppl"):
        assert f"### {task}" in md
    # Recovery for the accuracy task comes from the frame: 0.45 / 0.50 = 90.0%.
    rec = results.query("task == 'qeval_analogy' and metric == 'acc' and quant == 'bnb-nf4'").recovery.item()
    assert f"{rec * 100:.1f}%" == "90.0%"
    assert table_line(md, "qeval_analogy", "bnb-nf4") == "| bnb-nf4 | 0.4500 ± 0.02000 | 100 | -0.05000 | n/a | n/a | 90.0% |"
    assert table_line(md, "qeval_analogy", "none") == "| none | 0.5000 ± 0.02000 | 100 | 0 | n/a | n/a | 100.0% |"
    # Perplexity shows the ratio value/baseline (27/20) and says so.
    assert table_line(md, "qeval_lee_ppl", "bnb-nf4") == "| bnb-nf4 | 27.00 ± 0.02000 | 100 | +7.000 | n/a | n/a | ×1.350 |"
    assert "shown as the ratio" in md
    # Secondary metrics appear value-only.
    assert "acc_norm ↑" in md and "byte_perplexity ↓" in md
    # Meta: fingerprint shortened to 12 characters, versions, sha, device.
    assert "0123456789ab" in md and "0123456789abc" not in md
    assert "torch 2.5.1" in md and "deadbeefcafe" in md and "Device: cpu" in md
    # Memory table: MiB with one decimal and bits/weight measured vs theory.
    assert "| bnb-nf4 | 110.0 | 70.0 | 3.0 | 40.0 | 109.0 |" in md
    assert "4.600 vs 4.500" in md
    assert "![" in md and "](recovery.png)" in md and "](memory_vs_score.png)" in md


def test_html_is_self_contained(rendered):
    _, out, _ = rendered
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 2
    assert "http" not in page
    assert "<link" not in page and "<script" not in page
    assert "90.0%" in page and "×1.350" in page and "bnb-nf4" in page


def test_pngs_are_valid(rendered):
    _, out, _ = rendered
    for name in ("recovery.png", "memory_vs_score.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000


def test_rendering_is_deterministic(tmp_path):
    a = build.render(make_results(), make_memory(), META, tmp_path / "a")
    b = build.render(make_results(), make_memory(), META, tmp_path / "b")
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_missing_baseline_renders_na(tmp_path):
    paths = build.render(make_results(with_baseline=False), make_memory(with_baseline=False), {}, tmp_path)
    assert [p.name for p in paths] == FILES
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert table_line(md, "qeval_analogy", "bnb-nf4") == "| bnb-nf4 | 0.4500 ± 0.02000 | 100 | n/a | n/a | n/a | n/a |"
    assert table_line(md, "qeval_lee_ppl", "bnb-int8").endswith("| n/a | n/a |")
    assert (tmp_path / "recovery.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("empty", [pd.DataFrame(columns=frames.RESULT_COLUMNS), pd.DataFrame()])
def test_empty_results(tmp_path, empty):
    paths = build.render(empty, pd.DataFrame(), {"title": "nothing"}, tmp_path / "new" / "dir")
    assert [p.name for p in paths] == FILES
    md = (tmp_path / "new" / "dir" / "report.md").read_text(encoding="utf-8")
    assert "no results" in md.lower()
    assert "http" not in (tmp_path / "new" / "dir" / "report.html").read_text(encoding="utf-8")
    assert list(pd.read_csv(tmp_path / "new" / "dir" / "results.csv").columns) == frames.RESULT_COLUMNS


def test_adapter_and_extra_variants(tmp_path):
    """Any number of formats, adapters, and a second model still render with sensible labels."""
    results = make_results()
    extra = results[results.quant == "bnb-nf4"].assign(quant="bnb-nf4-dq", adapter="lora", key="x")
    other = results.assign(model="/models/other-model")
    memory = make_memory()
    memory = pd.concat([memory, memory[memory.quant == "bnb-nf4"].assign(quant="bnb-nf4-dq", adapter="lora"),
                        memory.assign(model="/models/other-model")])
    build.render(pd.concat([results, extra, other]), memory, META, tmp_path)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "bnb-nf4-dq+lora" in md and "/models/other-model" in md


def test_formatters():
    assert fmt.fmt_num(math.nan) == "n/a"
    assert fmt.fmt_num(12345.6) == "12346"
    assert fmt.fmt_num(0.012345) == "0.01235"
    assert fmt.fmt_num(-0.05, signed=True) == "-0.05000"
    assert fmt.fmt_pct(0.9) == "90.0%"
    assert fmt.fmt_mib(3 * MIB) == "3.0"
    assert fmt.variant_label("bnb-nf4", "lora") == "bnb-nf4+lora"
    assert fmt.variant_label("bnb-nf4", math.nan) == "bnb-nf4"


def test_markdown_escapes_user_text():
    """Task names and model paths come from users: Markdown shows them as text, as HTML does."""
    from qeval.report.doc import Bullets, Heading, Para, Table, to_markdown

    evil = "<img src=x onerror=alert(1)> **b** [l](javascript:x) _e_ |"
    md = to_markdown([Heading(3, evil + "\n# injected"), Para(evil), Bullets([evil]),
                      Table(["task"], [[evil]], [False])])
    assert "<img" not in md and "&lt;img" in md
    assert "**b**" not in md and "[l](" not in md and " _e_ " not in md
    assert "\n# injected" not in md
    assert "| &lt;img src=x onerror=alert(1)&gt; \\*\\*b\\*\\* \\[l\\](javascript:x) \\_e\\_ \\| |" in md
    assert to_markdown([Heading(3, "qeval_analogy")]).startswith("### qeval_analogy")


def test_every_variant_of_a_large_plan_gets_its_own_colour():
    """The default plan has 12 arms; tab10 gave two of them the same colour in recovery.png."""
    import pandas as pd

    from qeval.report.plots import variant_colors

    quants = ["none", "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq"]
    rows = [{"model": "m", "quant": q, "adapter": a} for q in quants for a in ("", "lora")]
    colours = variant_colors(pd.DataFrame(rows), multi_model=False)
    assert len(colours) == 12 and len(set(colours.values())) == 12


def test_sections_render_in_registered_order_and_history_shows_version_changes(tmp_path):
    """The registry holds every section once, in reading order; a history frame (two nightly runs,
    the second on new library versions) adds its section, its CSV and its plot before the closing plots."""
    from qeval.report.sections import SECTIONS

    assert [s.name for s in SECTIONS] == ["title", "summary", "about", "accuracy", "memory", "formats", "speed",
                                          "parity", "significance", "divergence", "adapters", "history", "figures"]
    hist = pd.DataFrame([{"run_id": run, "started_at": f"2024-01-0{run}T00:00:00", "git_sha": "deadbeefcafe",
                          "versions_changed": "" if run == 1 else "torch 2.5 -> 2.6", "model": MODEL, "arm": arm,
                          "variant_id": arm, "task": "qeval_analogy", "metric": "acc", "value": value,
                          "stderr": 0.01, "computed": True, "key": f"{arm}{run}"}
                         for run, values in ((1, (0.5, 0.4)), (2, (0.5, 0.45))) for arm, value in zip(("none", "bnb-nf4"), values)])
    paths = build.render(make_results(), make_memory(), META, tmp_path, history=hist)
    assert {"history.csv", "history.png"} <= {p.name for p in paths}
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert md.index("## History (nightly runs)") < md.index("## Plots")
    assert "| run | bnb-nf4 | none |" in md and "| 2 † | 0.4500 | 0.5000 |" in md  # arms by name
