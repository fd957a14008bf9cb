"""`qeval parity`: qeval's simulated GGUF formats against llama.cpp's own runtime (qeval.eval.parity).

`qeval parity --setup` builds the runtime once (llama-cpp-python's pinned source, cmake, into the
qeval cache); `qeval parity --formats gguf:q8_0 gguf:q4_0` writes a real .gguf file per format,
scores the divergence task's tokens with llama.cpp and with qeval's simulation, and writes the parity
table (parity.md, parity.json) under --out. Without a built runtime it exits 2 with the reason.
"""
from __future__ import annotations

from pathlib import Path

from qeval.cli.base import Command, QevalError, positive_int, register


def arguments(p) -> None:
    p.add_argument("--setup", action="store_true", help="build llama.cpp's runtime into the qeval cache and exit")
    p.add_argument("--model", default="smollm2-135m", help="an embedded model or a .gguf file (default smollm2-135m)")
    p.add_argument("--formats", nargs="*", default=["gguf:q8_0", "gguf:q4_0"], help="gguf: formats to check")
    p.add_argument("--docs", type=positive_int, default=8, help="divergence-task documents scored (default 8)")
    p.add_argument("--ctx", type=positive_int, default=256, help="tokens per document, BOS included (default 256)")
    p.add_argument("--out", type=Path, default=Path("parity"), help="folder for parity.md, parity.json, the .gguf files")


def render(result) -> str:
    """The parity table (markdown), as the report's parity section shows it."""
    import dataclasses

    from qeval.report.doc import to_markdown
    from qeval.report.sections.parity import parity_blocks

    rows = [dataclasses.asdict(r) for r in result.rows]
    return to_markdown(parity_blocks(result.model, result.docs, result.ctx, result.runtime, result.floor_kl,
                                     result.threshold, rows))


def run(args) -> int:
    from qeval.quant.backends import llama_runtime

    if args.setup:
        llama_runtime.build()
        return 0
    bad = [f for f in args.formats if not f.startswith("gguf:")]
    if bad:
        raise QevalError("qeval parity --formats", bad[0], "gguf: formats (e.g. gguf:q8_0)", "see `qeval formats`")
    reason = llama_runtime.missing_reason()
    if reason:
        raise QevalError("qeval parity", reason.split(" (")[0], "a built llama.cpp runtime",
                         f"run `{llama_runtime.SETUP_COMMAND}` once")
    from qeval.core.files import atomic_write
    from qeval.eval.parity import run_parity

    result = run_parity(args.model, list(args.formats), args.docs, args.ctx, args.out)
    atomic_write(args.out / "parity.json", result.to_json())
    atomic_write(args.out / "parity.md", render(result))
    print(render(result))
    return 0


register(Command("parity", "GGUF formats: qeval's simulation against llama.cpp's runtime, per token", run, arguments))
