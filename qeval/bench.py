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

from qeval.files import atomic_write
from qeval.memory import PeakMemory
from qeval.models import load_model, resolve_model
from qeval.quant import FORMATS

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
