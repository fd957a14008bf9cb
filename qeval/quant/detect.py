"""Is a "full-precision" baseline already quantized? Two censuses, one banner.

1. A model converted from a GGUF file: the file's own tensor types, counted exactly with gguf-py's
   `GGUFReader` (`gguf_census`; the Gemma-3-270M Q4_K_M file: Q5_0 81, Q4_K 27, Q8_0 10, Q6_K 9,
   F32 109). Nothing is guessed: the file says what it holds.
2. Any other checkpoint: a grid test on its linear weights (`grid_census`). A weight dequantized from a
   block format is, inside each block, `scale x integer + offset` with at most 2^b integers (GGUF
   Q4_0..Q8_0 and the K-quants' sub-blocks, NF4's absmax blocks are not uniform and are not claimed
   here, int4/int8 with groups). Per block the test fits the offset (the block's minimum) and the
   scale, checks every value lies within `TOL` of an integer multiple, and counts the levels the
   span needs; a float weight fails at once (its smallest gap makes the span need far more than
   2^8 levels). Counting distinct values (the census before this one) cannot see a 5-, 6- or 8-bit
   grid: a block of 32 weights holds at most 32 values whatever its grid.

   The scale is found, not assumed: the smallest gap between the block's sorted distinct values is a
   whole number of steps (`g`), so the candidates are that gap / g for g = 1..`MAX_GAP_STEPS` (each
   refined to span / its whole number of steps); the largest candidate that fits is the step. Blocks run along the input dimension (rows), of 256,
   128, 64, 32 and 16 weights; per tensor the largest block size at which most blocks fit wins (a
   Q4_K tensor fits at 32, its sub-block, not at 256; Q6_K at 16), and its bits are the smallest b
   that most blocks fit in.

The grid census is memoized per model fingerprint (reading ~0.5 GB of float32 takes seconds).
numpy only: `qeval report` (which shows the banner) imports no torch for it.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from qeval.core import env
from qeval.core.files import atomic_write

# names of 2-D weights that are not linear layers a backend quantizes
_SKIP = ("embed", "norm", "lm_head", "wte", "wpe")
BLOCKS = (256, 128, 64, 32, 16)  # largest first: the first size most blocks fit is the format's block
MAX_BITS = 8
TOL = 0.02  # of one step: a float32 dequantized value is off by ~1e-5 steps, a random one fits by chance 4% of the time
MAX_GAP_STEPS = 16  # the smallest gap between distinct values, in steps, that the scale search tries
MOST = 0.5  # "most blocks": the share a grid must fit
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # GGUF tensor types that are not quantized
CENSUS_VERSION = 2  # part of the memo's name: a census computed by an older rule is not reused


def gguf_census(path: Path) -> dict[str, int]:
    """Tensors per GGUF type in the file ({"Q4_1": 211, "F32": 61}), most frequent first, read from its
    header alone (`gguf_tensor_types`; no tensor data is read)."""
    from gguf import GGMLQuantizationType

    counts = Counter(GGMLQuantizationType(t).name for t in gguf_tensor_types(path))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# GGUF metadata value types -> their fixed sizes in bytes (8: string, 9: array are variable)
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_tensor_types(path: Path) -> list[int]:
    """The GGML type of every tensor of a GGUF file (v2/v3, little-endian), from its header.

    Why not gguf-py's GGUFReader: it decodes every metadata field, and a tokenizer's ~50k vocabulary
    strings take it seconds (40 s on a loaded 2-core machine) each time a report is rendered; this
    skips the metadata values and reads only the tensor infos."""
    import struct

    with open(path, "rb") as fh:
        data = fh.read(1 << 20)
        pos = 0

        def need(n: int) -> None:
            nonlocal data
            while pos + n > len(data):
                more = fh.read(max(1 << 20, n))
                if not more:
                    raise ValueError(f"{path}: truncated GGUF header")
                data += more

        def u(fmt: str) -> int:
            nonlocal pos
            size = struct.calcsize(fmt)
            need(size)
            (v,) = struct.unpack_from(fmt, data, pos)
            pos += size
            return v

        def skip_string() -> None:
            nonlocal pos
            n = u("<Q")
            need(n)
            pos += n

        def skip_value(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:
                skip_string()
            elif vtype == 9:
                etype, count = u("<I"), u("<Q")
                if etype in _GGUF_SIZES:
                    need(_GGUF_SIZES[etype] * count)
                    pos += _GGUF_SIZES[etype] * count
                else:
                    for _ in range(count):
                        skip_value(etype)
            else:
                need(_GGUF_SIZES[vtype])
                pos += _GGUF_SIZES[vtype]

        if u("<I") != 0x46554747:  # b"GGUF"
            raise ValueError(f"{path}: not a GGUF file")
        u("<I")  # version
        n_tensors, n_kv = u("<Q"), u("<Q")
        for _ in range(n_kv):
            skip_string()
            skip_value(u("<I"))
        types = []
        for _ in range(n_tensors):
            skip_string()
            n_dims = u("<I")
            need(8 * n_dims)
            pos += 8 * n_dims
            types.append(u("<I"))
            u("<Q")  # offset
        return types


def block_bits(w: np.ndarray, block: int) -> np.ndarray:
    """Per block of `block` consecutive weights along each row of the 2-D `w`: the bits of the
    smallest uniform grid (scale x integer + offset) its values lie on, 1 for a constant block, and 0
    for a block on no grid of `MAX_BITS` bits or fewer."""
    b = np.sort(np.asarray(w, dtype=np.float64).reshape(-1, block), axis=1)
    lo, span = b[:, 0], b[:, -1] - b[:, 0]
    gaps = np.diff(b, axis=1)
    gaps = np.where(gaps > 0, gaps, np.inf)
    dmin = gaps.min(axis=1)
    out = np.zeros(len(b), dtype=np.int64)
    out[span == 0] = 1
    todo = np.flatnonzero((span > 0) & np.isfinite(dmin))
    max_levels = 2 ** MAX_BITS
    for g in range(1, MAX_GAP_STEPS + 1):
        if not len(todo):
            break
        # the span is a whole number of steps too, and far longer than the smallest gap: the step read
        # from it is as exact as the values (the gap's rounding, times ~255 levels, would not be)
        steps = np.rint(span[todo] * g / dmin[todo])
        step = span[todo] / steps
        levels = steps + 1
        possible = levels <= max_levels  # a finer step only adds levels: a block past the limit is done
        todo, step, levels = todo[possible], step[possible], levels[possible]
        x = (b[todo] - lo[todo, None]) / step[:, None]
        fits = (np.abs(x - np.rint(x)) <= TOL).all(axis=1)
        out[todo[fits]] = np.ceil(np.log2(np.maximum(levels[fits], 2))).astype(np.int64)
        todo = todo[~fits]
    return out


def tensor_grid(w: np.ndarray) -> dict | None:
    """The grid most of the tensor's blocks sit on: {"block", "bits", "blocks", "fit"} (`fit`: blocks
    on a grid of `bits` or fewer), at the largest block size where most fit; None when none does."""
    for block in BLOCKS:
        if w.ndim != 2 or w.shape[1] % block:
            continue
        bits = block_bits(w, block)
        for b in range(1, MAX_BITS + 1):
            fit = int(((bits >= 1) & (bits <= b)).sum())
            if fit > MOST * len(bits):
                return {"block": block, "bits": max(b, 2), "blocks": len(bits), "fit": fit}
    return None


def grid_census(folder: Path) -> dict:
    """Over the folder's linear weights (2-D, rows a multiple of 16): {"tensors", "gridded", "blocks",
    "fit", "grids"} where `grids` counts tensors per "<bits>-bit/<block>" grid and `blocks` / `fit`
    sum the gridded tensors' blocks and those that fit."""
    tensors = gridded = blocks = fit = 0
    grids: Counter = Counter()
    for f in sorted(Path(folder).glob("*.safetensors")):
        for _, w in _weights(f):
            if w.ndim != 2 or w.shape[1] % BLOCKS[-1]:
                continue
            tensors += 1
            found = tensor_grid(w)
            if found is None:
                continue
            gridded += 1
            blocks += found["blocks"]
            fit += found["fit"]
            grids[f"{found['bits']}-bit/{found['block']}"] += 1
    return {"tensors": tensors, "gridded": gridded, "blocks": blocks, "fit": fit,
            "grids": dict(sorted(grids.items(), key=lambda kv: (-kv[1], kv[0])))}


def _weights(path: Path):
    """(name, array) of the file's linear weights. numpy, so `qeval report` imports no torch; numpy has
    no bfloat16, so a bf16 file is read through torch and widened to float32 (exact: every bf16
    value is a float32 value, so the grids are unchanged)."""
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


def source_types(folder: Path) -> dict | None:
    """For a folder converted from a GGUF file: {"gguf": file name, "types": its tensors per type},
    written at conversion (`qeval-source.json`) or, for a folder converted before that, read from
    the file; None for any other folder (or when neither says)."""
    src = Path(folder) / "qeval-source.json"
    try:
        meta = json.loads(src.read_text(encoding="utf-8")) if src.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    if not meta.get("gguf"):
        return None
    if meta.get("gguf_types"):
        return {"gguf": Path(meta["gguf"]).name, "types": meta["gguf_types"]}
    if Path(meta["gguf"]).is_file():
        return {"gguf": Path(meta["gguf"]).name, "types": gguf_census(Path(meta["gguf"]))}
    return None


def baseline_census(folder: Path, fingerprint: str) -> dict | None:
    """The census the banner shows: a GGUF-converted folder's file types (`source_types`), else the
    grid census, memoized by the model's content fingerprint. None when the folder is gone."""
    found = source_types(Path(folder))
    if found is not None:
        return found
    memo = env.cache_dir() / "grid-census" / f"v{CENSUS_VERSION}-{fingerprint[:32]}.json"
    if memo.is_file():
        return json.loads(memo.read_text())
    if not Path(folder).is_dir():
        return None
    out = grid_census(Path(folder))
    atomic_write(memo, json.dumps(out))
    return out


def banner(census: dict | None, source: str = "") -> str:
    """One sentence for the report when the baseline is already quantized; '' otherwise."""
    if not census:
        return ""
    where = f" ({source})" if source else ""
    types = census.get("types")
    if types is not None:
        if all(t in FLOAT_TYPES for t in types):
            return ""
        listed = ", ".join(f"{t} {n}" for t, n in types.items())
        return (f"Baseline weights are already quantized{where}: they were dequantized from {census['gguf']}, whose "
                f"tensors are {listed} (tensor types read from the file). Losses below are measured against a "
                "quantized model, and a format with the same grid can look lossless.")
    if not census.get("tensors") or census.get("gridded", 0) <= MOST * census["tensors"]:
        return ""
    grids = ", ".join(f"{g} in {n}" for g, n in census["grids"].items())
    return (f"Baseline weights look already quantized{where}: {census['gridded']} of {census['tensors']} linear "
            f"layers sit on a uniform grid per block (bits/block size: {grids}; {census['fit']:,} of "
            f"{census['blocks']:,} blocks fit). Losses below are measured against a quantized model, and a format "
            "with the same grid can look lossless.")
