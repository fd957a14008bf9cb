"""Report section: GGUF parity -- qeval's simulated GGUF formats against llama.cpp's own runtime on
the same tokens (`qeval.eval.parity`, stored as ParityRecords by a plan's `parity:` stage), and
parity.csv. `qeval parity` prints the same table (`parity_blocks`)."""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from qeval.report.doc import Heading, Para, Section, Table
from qeval.report.sections.base import ReportSection, register

PARITY_CSV = "parity.csv"
COLUMNS = ["format", "file types", "KL(sim‖runtime)", "± se", "top-1 agree", "ppl sim", "ppl runtime",
           "ppl ratio", "KL(base‖sim)", "departs"]


def parity_blocks(model: str, docs: int, ctx: int, runtime: str, floor_kl: float, threshold: float,
                  rows: list[Mapping[str, Any]], level: int = 2) -> list:
    """The parity table of one model with its reading: the float row first (the noise floor)."""
    lines = []
    for i, r in enumerate(rows):
        types = " ".join(f"{k} {v}" for k, v in sorted(r["file_types"].items()))
        base = "" if r.get("kl_base_sim") is None else f"{r['kl_base_sim']:.3g}"
        flag = "—" if i == 0 else ("yes" if r["flagged"] else "no")
        lines.append([r["format"], types, f"{r['kl_sim_runtime']:.3g}", f"{r['kl_se']:.2g}", f"{r['top1']:.4f}",
                      f"{r['ppl_sim']:.4g}", f"{r['ppl_runtime']:.4g}", f"{r['ppl_runtime'] / r['ppl_sim']:.4f}", base, flag])
    flagged = [r["format"] for r in rows[1:] if r["flagged"]]
    # how much of each departure is the runtime's own rounding, in scale: against the format's damage
    scale = [f"{r['format']} {r['kl_sim_runtime'] / r['kl_base_sim']:.0%}" for r in rows[1:]
             if r.get("kl_base_sim")]
    return [Heading(level, f"GGUF parity: qeval's simulation against llama.cpp ({runtime})"),
            Para(f"{model}, {docs} Lee news documents x {ctx} tokens, CPU: each format written as a real .gguf file "
                 "(the model's own GGUF as the template) and scored by llama.cpp, position by position against "
                 "qeval's simulated numerics (float compute over the same dequantized weights). Noise floor: KL of "
                 f"the float path (all-F32 file vs qeval's float model) = {floor_kl:.3g}; a format departs above "
                 f"{threshold:.3g} (10x the floor). llama.cpp's CPU kernels also quantize the activations "
                 "(Q8_0 / Q8_1 / Q8_K dot products), which the simulation does not."),
            Table(COLUMNS, lines, [False, False, True, True, True, True, True, True, True, False]),
            Para(("Departs beyond the noise floor: " + ", ".join(flagged) + " — llama.cpp's numbers for these "
                  "differ from the simulation's by more than accumulation noise." if flagged
                  else "No format departs beyond the noise floor.")
                 + (" The departure as a share of the format's own damage (KL(sim‖runtime) / KL(base‖sim)): "
                    + ", ".join(scale) + "." if scale else ""))]


def parity_section(records: tuple) -> Section | None:
    if not records:
        return None
    newest = {}
    for r in records:  # the newest check per model (records come oldest first)
        newest[r.model.spec] = r
    blocks, rows = [], []
    for rec in newest.values():
        s = rec.settings
        blocks += parity_blocks(rec.model.spec, s["docs"], s["ctx"], rec.runtime, rec.floor_kl, rec.threshold,
                                list(rec.rows))
        rows += [{"model": rec.model.spec, "runtime": rec.runtime, "docs": s["docs"], "ctx": s["ctx"],
                  "floor_kl": rec.floor_kl, "threshold": rec.threshold,
                  **{k: (" ".join(f"{t}:{n}" for t, n in sorted(v.items())) if k == "file_types" else v)
                     for k, v in r.items()}} for r in rec.rows]
    banners = []
    for rec in newest.values():  # the summary names what departs, in scale (issue 22: flagged there)
        out = [f"{r['format']} (KL {r['kl_sim_runtime']:.2g}"
               + (f", {r['kl_sim_runtime'] / r['kl_base_sim']:.0%} of its own KL)" if r.get("kl_base_sim") else ")")
               for r in rec.rows[1:] if r["flagged"]]
        if out:
            banners.append(f"GGUF parity ({rec.model.spec}, {rec.runtime}): llama.cpp's runtime departs from qeval's "
                           f"simulation beyond the noise floor (KL {rec.floor_kl:.2g}) for " + ", ".join(out)
                           + "; the runtime also rounds activations. See the GGUF parity section.")
    return Section(blocks, files={PARITY_CSV: pd.DataFrame(rows).to_csv(index=False).encode()}, banners=banners)


register(ReportSection("parity", 57, lambda d: d.parity or None, parity_section))
