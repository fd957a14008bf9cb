"""Is a "full-precision" baseline already quantized? A census of low-cardinality weight blocks.

A weight dequantized from a block format (GGUF Q4_0/Q4_1, NF4, int4 with groups) holds at most 2^bits
distinct values in each block; float weights hold one per weight. `grid_census` reads a model folder's
safetensors (no model is built) and counts, for each linear weight, the blocks of `block` consecutive
weights along a row that hold `max_distinct` or fewer distinct values. The embedded SmolLM2 (its
"float" weights come from a Q4_1 GGUF) shows a 4-bit grid in every block; a float model in none.
The result is memoized per model fingerprint (reading ~0.5 GB of float32 takes a few seconds).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qeval.core import env
from qeval.core.files import atomic_write

# names of 2-D weights that are not linear layers a backend quantizes
_SKIP = ("embed", "norm", "lm_head", "wte", "wpe")


def grid_census(folder: Path, block: int = 32, max_distinct: int = 16) -> dict:
    """{"tensors", "blocks", "low_blocks", "fraction", "block", "max_distinct"} over the folder's
    linear weights whose rows divide into blocks (others are skipped)."""
    tensors = blocks = low = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        for name, w in _weights(f):
            if w.ndim != 2 or w.shape[1] % block:
                continue
            b = np.sort(w.reshape(-1, block), axis=1)
            distinct = 1 + (b[:, 1:] != b[:, :-1]).sum(axis=1)
            tensors += 1
            blocks += b.shape[0]
            low += int((distinct <= max_distinct).sum())
    return {"tensors": tensors, "blocks": blocks, "low_blocks": low, "fraction": low / blocks if blocks else 0.0,
            "block": block, "max_distinct": max_distinct}


def _weights(path: Path):
    """(name, array) of the file's linear weights. numpy, so `qeval report` (which shows the census
    banner) imports no torch; numpy has no bfloat16, so a bf16 file is read through torch and widened
    to float32 (exact: every bf16 value is a float32 value, so the distinct counts are unchanged)."""
    from safetensors import safe_open

    with safe_open(str(path), "np") as st:
        names = [n for n in st.keys() if n.endswith(".weight") and not any(s in n for s in _SKIP)]
        for n in names:
            try:
                w = st.get_tensor(n)
            except (TypeError, ValueError):  # a dtype numpy lacks (bfloat16): this tensor through torch
                with safe_open(str(path), "pt") as pt:
                    w = pt.get_tensor(n).float().numpy()
            yield n, w


def cached_grid_census(folder: Path, fingerprint: str) -> dict | None:
    """`grid_census` memoized by the model's content fingerprint; None when the folder is gone."""
    memo = env.cache_dir() / "grid-census" / f"{fingerprint[:32]}.json"
    if memo.is_file():
        return json.loads(memo.read_text())
    if not Path(folder).is_dir():
        return None
    out = grid_census(Path(folder))
    atomic_write(memo, json.dumps(out))
    return out


def banner(census: dict | None, source: str = "") -> str:
    """One sentence for the report when most blocks sit on a grid; '' otherwise."""
    if not census or census["fraction"] < 0.5:
        return ""
    bits = max(1, (census["max_distinct"] - 1).bit_length())
    where = f" ({source})" if source else ""
    return (f"Baseline weights look already quantized{where}: {census['fraction']:.0%} of "
            f"{census['blocks']:,} blocks of {census['block']} weights in {census['tensors']} linear layers hold "
            f"at most {census['max_distinct']} distinct values (a {bits}-bit grid, Q4-like). Losses below are "
            "measured against a quantized model, and a format with the same grid can look lossless.")
