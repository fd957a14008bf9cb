"""Speed records as a frame, and the two judgements the report makes with them: which formats are
dominated on accuracy, memory and decode speed together, and which is the fastest whose loss is within
the non-inferiority margin on every task (`qeval.stats.margin`'s verdicts).

Pure pandas over stored records (no torch): the report reads it.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import pandas as pd

from qeval.stats.margin import CANNOT_TELL, WITHIN
from qeval.store.record import SpeedRecord

SPEED_COLUMNS = ["model", "quant", "adapter", "arm", "kernel", "mark", "prefill_tok_s", "prefill_batch",
                 "decode_tok_s_b1", "decode_tok_s_b8", "ttft_s_b1", "ttft_s_b8", "peak_bytes", "peak_kind",
                 "identity", "device", "seconds", "settings"]


def speed_frame(records: Iterable[SpeedRecord]) -> pd.DataFrame:
    """One row per (model, arm): its latest speed record (records come oldest first). Decode speed and
    time to first token per decode batch 1 and 8 (NaN when the settings measured another batch)."""
    rows = {}
    for r in records:
        ident = ", ".join(f"{k} {v}" for k, v in r.identity.items() if k != "kind")
        rows[(r.variant.model, r.variant.arm)] = {
            "model": r.variant.model, "quant": r.variant.quant, "adapter": r.variant.adapter_label,
            "arm": r.variant.arm, "kernel": r.kernel, "mark": r.mark, "prefill_tok_s": r.prefill_tok_s,
            "prefill_batch": r.settings.get("prefill_batch"),
            "decode_tok_s_b1": r.decode_tok_s(1), "decode_tok_s_b8": r.decode_tok_s(8),
            "ttft_s_b1": float((r.decode.get("1") or {}).get("ttft_s", math.nan)),
            "ttft_s_b8": float((r.decode.get("8") or {}).get("ttft_s", math.nan)),
            "peak_bytes": r.peak_bytes, "peak_kind": r.peak_kind, "identity": ident, "device": r.device,
            "seconds": r.seconds,
            "settings": (f"prompt {r.settings.get('prompt_tokens')} tokens, {r.settings.get('new_tokens')} new "
                         f"tokens greedy, warm-up {r.settings.get('warmup')}")}
    return pd.DataFrame(list(rows.values()), columns=SPEED_COLUMNS)


def dominated(points: Mapping[str, tuple[float, float, float]]) -> dict[str, list[str]]:
    """{name: the names that dominate it} over (accuracy: higher better, bytes: lower better, decode
    tokens/s: higher better): another point at least as good on all three and strictly better on one.
    A point with a NaN coordinate neither dominates nor is dominated (nothing to compare)."""
    def ok(p) -> bool:
        return not any(math.isnan(float(x)) for x in p)

    out: dict[str, list[str]] = {}
    for a, pa in points.items():
        if not ok(pa):
            continue
        by = [b for b, pb in points.items() if b != a and ok(pb)
              and pb[0] >= pa[0] and pb[1] <= pa[1] and pb[2] >= pa[2]
              and (pb[0] > pa[0] or pb[1] < pa[1] or pb[2] > pa[2])]
        if by:
            out[a] = by
    return out


def within_margin(verdicts: Mapping[str, str]) -> bool:
    """Whether a format's loss is within the margin: every task's verdict is 'within' (and it has tasks)."""
    return bool(verdicts) and all(v == WITHIN for v in verdicts.values())


def not_beyond(verdicts: Mapping[str, str]) -> bool:
    """No task's loss shown beyond the margin, and none untested: each is 'within' or 'cannot tell'."""
    return bool(verdicts) and all(v in (WITHIN, CANNOT_TELL) for v in verdicts.values())


def fastest_within(speed: Mapping[str, float], verdicts: Mapping[str, Mapping[str, str]], rule=within_margin) -> str | None:
    """The format with the highest decode speed among those whose loss is within the margin on every
    task (`verdicts`: format -> task -> margin verdict; `rule`: `not_beyond` for the weaker reading);
    None when no format qualifies. `speed`
    holds real kernels only: a simulated format's speed is not its kernel's."""
    ok = [(s, q) for q, s in speed.items() if not math.isnan(float(s)) and rule(verdicts.get(q, {}))]
    return max(ok)[1] if ok else None
