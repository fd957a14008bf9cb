"""How the report writes a number, a size, a share or a variant's name: one formatter per kind, so a
column reads the same way in every section. NaN (and None) show as 'n/a'."""
from __future__ import annotations

import math

import pandas as pd

from qeval.core.names import BASELINE  # noqa: F401  (one definition; re-exported for the sections)
NA = "n/a"
MIB = 2 ** 20


def missing(x: object) -> bool:
    try:
        return x is None or pd.isna(x)
    except (TypeError, ValueError):  # pd.isna of a list-like is an array, not a verdict
        return False


def fmt_num(x: object, sig: int = 4, signed: bool = False) -> str:
    """`x` to `sig` significant digits, in fixed notation for ordinary magnitudes; NaN -> 'n/a'.

    Fixed rather than '%g' because perplexities in the thousands would otherwise print as 1.234e+03,
    and a column of numbers should read the same way down the column."""
    if missing(x):
        return NA
    x = float(x)
    if x == 0:
        return "0"
    sign = "+" if signed else ""
    if math.isinf(x) or not 1e-4 <= abs(x) < 1e15:
        return f"{x:{sign}.{sig}g}"
    decimals = max(0, sig - 1 - math.floor(math.log10(abs(x))))
    return f"{x:{sign}.{decimals}f}"


def fmt_mib(nbytes: object) -> str:
    """Bytes as MiB with one decimal."""
    return NA if missing(nbytes) else f"{float(nbytes) / MIB:.1f}"


def fmt_pct(fraction: object) -> str:
    """A fraction (1.0 = 100%) as a percent with one decimal."""
    return NA if missing(fraction) else f"{float(fraction) * 100:.1f}%"


def fmt_ratio(ratio: object) -> str:
    """A multiplicative ratio, e.g. '×1.350'."""
    return NA if missing(ratio) else f"×{fmt_num(ratio)}"


def fmt_int(n: object) -> str:
    return NA if missing(n) else str(int(n))


def fmt_value_stderr(value: object, stderr: object) -> str:
    if missing(stderr):
        return fmt_num(value)
    return f"{fmt_num(value)} ± {fmt_num(stderr)}"


def fmt_effect(x: object, relative: bool) -> str:
    """An effect size: relative ones (perplexity) as a percent, absolute ones (accuracy) as points."""
    if missing(x):
        return NA
    return f"{float(x) * 100:.2f}%" if relative else f"{float(x) * 100:.1f} pts"


def adapter_name(adapter: object) -> str:
    # A frame read back from CSV turns '' into NaN; both mean "no adapter".
    return "" if missing(adapter) else str(adapter)


def variant_label(quant: str, adapter: object = "") -> str:
    """The name a variant goes by everywhere in the report: quant, plus '+adapter' when there is one."""
    a = adapter_name(adapter)
    return f"{quant}+{a}" if a else str(quant)
