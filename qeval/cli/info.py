"""`qeval formats`, `qeval suites`: what qeval knows; `qeval setup`: build suite data, convert the model."""
from __future__ import annotations

from qeval.cli.base import Command, register


def cmd_formats(args) -> int:
    from qeval.quant.formats import FORMATS

    for name, f in FORMATS.items():
        bits = f"{f.bits_per_weight(576):.3f} bits/weight" if f.bits_per_weight else "full precision"
        print(f"{name:20s} {bits:20s} {f.kernel if f.bits_per_weight else '':9s} {f.description}")
    return 0


def cmd_suites(args) -> int:
    from qeval.eval.suites import load_suite, shipped_suites, shipped_tasks

    for name in shipped_suites():
        s = load_suite(name)
        tasks = ", ".join(f"{t.task} (limit {t.limit})" for t in s.tasks)
        print(f"{name:10s} {s.description}\n{'':10s} tasks: {tasks}")
    print("shipped tasks: " + ", ".join(shipped_tasks()) + "; online, any lm-eval task name works too")
    return 0


def setup_arguments(ps) -> None:
    ps.add_argument("--backend", choices=["gguf-k", "gptq"], action="append", default=[],
                    help="instead: set up an optional backend (repeatable). gguf-k: llama.cpp's ggml library "
                         "for the GGUF K-quants (pip download of the llama-cpp-python source + cmake, ~1 min); "
                         "gptq: a venv under the cache with gptqmodel and torch pinned (minutes, needs the "
                         "package index)")


def cmd_setup(args) -> int:
    if args.backend:  # only the named backends' parts, not the suite data or the model
        if "gguf-k" in args.backend:
            from qeval.quant.backends import ggml_lib

            ggml_lib.build()
        if "gptq" in args.backend:
            from qeval.quant.backends.gptq import setup_env

            print(f"gptq env: {setup_env()}")
        return 0
    from qeval.data.suite_data import build_all
    from qeval.models.load import DEFAULT_MODEL, resolve_model

    for name, entry in build_all().items():
        print(f"suite data {name}: {entry['rows']} rows (sha256 {entry['sha256'][:12]})")
    m = resolve_model(DEFAULT_MODEL)
    print(f"model {m.spec}: {m.path} (fingerprint {m.fingerprint[:12]})")
    return 0


register(Command("formats", "list the quantization formats", cmd_formats))
register(Command("suites", "list the shipped suites and tasks", cmd_suites))
register(Command("setup", "build the suite data and convert the embedded model (once)", cmd_setup, setup_arguments))
