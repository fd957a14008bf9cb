"""The backend contract (qeval.quant.backend) is the whole of what a backend must say: a toy backend
declared here, and nowhere else, shows up in `qeval formats`, runs on the tiny model, and lands in
the report's tables and in the Pareto plot's data with its own colour.

`toy:int6`: every quantizable linear weight rounded to a symmetric 6-bit grid with one fp32 scale per
row, kept in float (simulated compute); its packed size is what 6-bit codes + the scales would take.
"""
from __future__ import annotations

import math

import pandas as pd
import pytest

from qeval.quant.backend import BACKENDS, Backend, backend_colour, mark, marked_account
from qeval.quant.formats import FORMATS, QuantFormat, bad_option, quantizable_linears

TOY_COLOUR = "tab:cyan"
LEVELS = 31  # symmetric 6-bit codes: -31 .. 31


def _apply(model, device, compute_dtype) -> None:
    import torch

    with torch.no_grad():
        for _, m in quantizable_linears(model):
            w = m.weight.float()
            scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / LEVELS
            m.weight.copy_((torch.round(w / scale).clamp(-LEVELS, LEVELS) * scale).to(m.weight.dtype))
            rows, cols = m.weight.shape
            mark(m, packed_bytes=rows * math.ceil(6 * cols / 8) + 4 * rows)


def _parse(scheme: str, options: tuple[str, ...]) -> QuantFormat:
    if options:
        raise bad_option("toy:int6", options[0], "no options")
    return QuantFormat(
        "toy:int6", "toy 6-bit codes, fp32 scale per row; simulated (rounded, kept in float)",
        lambda in_features: 6 + 32 / in_features, lambda compute_dtype: None, backend="toy", after_load=_apply,
        kernel="simulated", storage="float weights on a 6-bit grid", can_save=False, lora_trainable=False,
        options=(("bits", 6), ("scale", "row")), requires=BACKENDS.get("toy"),
        held_bits=lambda in_features, float_bits: float_bits)


if "toy" not in BACKENDS:  # the whole registration: nothing else in qeval knows this backend
    BACKENDS.add("toy", Backend("toy", "a test backend: 6-bit rows, simulated", _parse, ("int6",), extra="toy",
                                colour=TOY_COLOUR, account=marked_account))


def test_toy_backend_is_listed(capsys):
    from qeval.cli import main

    assert main(["formats"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("toy:int6"))
    assert "6.056 bits/weight" in line and "simulated" in line  # 6 + 32/576
    assert FORMATS.get("toy:int6").require("cpu") is FORMATS.get("toy:int6")


def test_toy_backend_runs_and_reports(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import matplotlib.axes

    from qeval.cli import main

    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\ntasks:\n  - {task: qeval_analogy, limit: 6, batch_size: 6}\n"
                     "  - {task: qeval_lee_ppl, limit: 2, divergence: true}\n")
    store, out = tmp_path / "store.sqlite", tmp_path / "report"
    assert main(["run", "--model", str(tiny_model_dir), "--formats", "none,toy:int6", "--suite", str(suite),
                 "--store", str(store), "--device", "cpu"]) == 0
    assert "4 computed" in capsys.readouterr().err

    drawn = []  # the Pareto plot's points: (x, y, edge colour)
    real = matplotlib.axes.Axes.scatter

    def spy(self, x, y, *a, **k):
        drawn.append((list(x), list(y), k.get("edgecolors", k.get("color"))))
        return real(self, x, y, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", spy)
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0

    results = pd.read_csv(out / "results.csv")
    assert "toy:int6" in set(results["quant"])
    land = pd.read_csv(out / "formats.csv")  # the landscape table, the Pareto plot's data
    toy = land[land["quant"] == "toy:int6"].iloc[0]
    assert toy["backend"] == "toy" and toy["kernel"] == "simulated" and not toy["lora_trainable"]
    assert 6 + 32 / 128 <= toy["theory_bits"] <= 6 + 32 / 64  # the tiny model's rows are 64 or 128 wide
    assert toy["packed_bits"] > 6 and toy["kl_mean"] > 0
    assert "toy:int6" in (out / "report.md").read_text()
    assert backend_colour("toy") == TOY_COLOUR
    assert any(c == TOY_COLOUR and x == [pytest.approx(toy["theory_bits"])] for x, _, c in drawn)
