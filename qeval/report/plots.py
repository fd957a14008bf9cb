"""What every report plot shares: the headless backend, PNG encoding, placeholders, one colour per
variant. Sections import `plt` from here, so the Agg backend is set before pyplot loads."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the harness runs on servers and in CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from qeval.report.fmt import variant_label  # noqa: E402
from qeval.report.frames import VARIANT, ordered  # noqa: E402

# the two pictures drawn by the accuracy and memory sections and shown again under "Plots"
RECOVERY_PNG = "recovery.png"
MEMORY_PNG = "memory_vs_score.png"

__all__ = ["plt", "png", "placeholder_png", "variant_colors", "plot_label"]


def png(fig: plt.Figure) -> bytes:
    """Encode and close a figure. No Software tag, so the same data gives the same bytes."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def placeholder_png(text: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    return png(fig)


def _model_short(model: str) -> str:
    # Model specs can be long local paths; the last component is enough to tell them apart on a plot.
    return Path(str(model).rstrip("/")).name or str(model)


def plot_label(r, multi_model: bool) -> str:
    label = variant_label(r.quant, r.adapter)
    return f"{_model_short(r.model)}: {label}" if multi_model else label


def variant_colors(results: pd.DataFrame, multi_model: bool) -> dict[str, object]:
    """One colour per variant label, shared by both plots so a variant looks the same in each."""
    labels = list(dict.fromkeys(plot_label(r, multi_model) for r in
                                ordered(results[VARIANT].drop_duplicates(), VARIANT).itertuples(index=False)))
    # tab10 while it suffices; the default plan has 12 arms, and tab20 keeps them distinct up to 20
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
