"""`qeval report` on the tiny store against a golden report.md captured from the renderer before it
was split into sections (tests/golden/tiny_report.md): the split is a refactor, so every heading,
table cell and number must come out as before.

What a rerun measures afresh rather than computes is normalised before comparing: the lines that
name the machine (when, which commit, library versions, device), the temporary folder, and the
measured times and memory peaks (table columns by header, GiB in sentences). Every score, delta,
interval, p, KL, byte count of the weights and verdict is compared as written. A library upgrade
that moves a number fails here on purpose: read the diff, then rewrite the golden with
QEVAL_UPDATE_GOLDEN=1 (and say why in the commit).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from qeval.cli import main

GOLDEN = Path(__file__).parent / "golden" / "tiny_report.md"
FILES = ["results.csv", "memory.csv", "formats.csv", "divergence.csv", "adapters.csv", "training.csv",
         "adapter_seeds.csv", "recovery.png", "memory_vs_score.png", "formats_pareto.png", "kl_vs_delta.png",
         "training_curves.png", "train_memory_vs_score.png", "speed.csv", "report.md", "report.html"]
_MACHINE = ("- Generated at: ", "- Git sha: ", "- Versions: ", "- Device: ", "Speed measured on: ")
# table columns (by header) that hold wall times or process memory measured by this run
_MEASURED = {"load s", "eval s", "peak MiB", "load+quantize s", "s/step", "tokens/s", "train s", "peak training MiB",
             "of which idle process MiB", "load peak MiB", "training peak MiB", "runtime", "process", "weights",
             "adapter + optimizer", "gradients", "activations", "predicted MiB", "error",
             # speed (qeval.models.speed): measured, and what is judged from it
             "decode tok/s (batch 1)", "prefill tok/s", "decode tok/s b1", "decode tok/s b8", "TTFT s", "dominated"}
_CELL = re.compile(r"(?<!\\)\|")


def normalised(md: str, tmp: Path) -> str:
    out, header = [], None
    for line in md.splitlines():
        line = line.replace(str(tmp), "<tmp>")
        if line.startswith(_MACHINE):
            line = line[:line.index(": ") + 2] + "<this machine>"
        elif line.startswith("|"):
            cells = _CELL.split(line)[1:-1]
            if header is None:
                header = [c.strip() for c in cells]
            elif not line.startswith("|---"):
                line = "|" + "|".join(" ~ " if h in _MEASURED else c for h, c in zip(header, cells)) + "|"
        else:
            header = None
            line = re.sub(r"\d+(\.\d+)? GiB\b", "~ GiB", line)  # the LoRA-vs-QLoRA verdict's measured peaks
            line = re.sub(r"\d+(\.\d+)?(e[+-]?\d+)? tokens/s\b", "~ tokens/s", line)  # measured decode speeds
            line = re.sub(r"(?<='none' )\d+(\.\d+)?(e[+-]?\d+)?", "~", line)
        out.append(line)
    return "\n".join(out) + "\n"


def test_report_md_is_the_golden_copy(tiny_store, tmp_path):
    store, model = tiny_store
    out = tmp_path / "report"
    assert main(["report", "--store", str(store), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    md = normalised((out / "report.md").read_text(encoding="utf-8"), model.parent)
    if os.environ.get("QEVAL_UPDATE_GOLDEN"):
        GOLDEN.write_text(md, encoding="utf-8")
    assert md == GOLDEN.read_text(encoding="utf-8")
