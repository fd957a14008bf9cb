"""qeval's command line: `qeval run`, `qeval report`, `qeval formats`, `qeval suites`, `qeval setup`.

Every user error is one line on stderr (the value, what was expected, the fix) and exit code 2;
a run whose cells failed exits 1; success exits 0.
"""
from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path

from qeval import env
from qeval.errors import QevalError
from qeval.quant import DEFAULT_FORMATS, FORMATS

EPILOG = """examples:
  qeval run                                   # all six formats of the embedded model, default suite
  qeval run --formats none,bnb-nf4 --suite smoke
  qeval run --model ./my-hf-folder --tasks qeval_analogy --limit 100
  qeval run --model meta-llama/Llama-3.2-1B --tasks hellaswag   # online: any hub id, any lm-eval task
  qeval run --plan plan.yaml && qeval report
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qeval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Measure what quantization costs an LLM: accuracy per task, bytes, time. "
                    "Results go to a SQLite store (computed once, reused on reruns); reports are "
                    "rendered from the store.")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="evaluate a model at several formats (only missing cells)",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    run.add_argument("--plan", type=Path, help="plan YAML (keys: models, formats, suite, device, seed, "
                     "bootstrap_iters); other flags override it")
    run.add_argument("--model", help="embedded name (smollm2-135m), HF folder, .gguf file, or hub id "
                     "(online only); default smollm2-135m")
    run.add_argument("--formats", help="comma-separated format names (see `qeval formats`); default: all six")
    run.add_argument("--suite", help="shipped suite name (see `qeval suites`) or suite YAML path; default: default")
    run.add_argument("--tasks", help="comma-separated lm-eval task names instead of a suite")
    run.add_argument("--limit", type=int, help="with --tasks: documents per task (default: all)")
    run.add_argument("--num-fewshot", type=int, default=0, help="with --tasks: few-shot examples (default 0)")
    run.add_argument("--batch-size", type=int, default=1, help="with --tasks: batch size (default 1)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: cuda if available")
    run.add_argument("--seed", type=int)
    run.add_argument("--store", type=Path, default=None, help=f"result store (default {env.default_store_path()}, "
                     "or $QEVAL_STORE)")

    rep = sub.add_parser("report", help="render reports/latest/ from the store")
    rep.add_argument("--store", type=Path, default=None)
    rep.add_argument("--out", type=Path, default=env.REPO_ROOT / "reports" / "latest")
    rep.add_argument("--memory-budget", type=_gib, metavar="GIB",
                     help="training memory you have, in GiB: the LoRA-vs-QLoRA verdict picks within it")

    nig = sub.add_parser("nightly", help="run a plan as a nightly regression job (exit 1 on regression)",
                         description="Run PLAN incrementally, record the run, compare every cell with the previous "
                                     "nightly run (paired bootstrap: only drops beyond noise count) and with the "
                                     "plan's thresholds. Exit 0 clean, 1 regression, 3 could not run, 2 bad input.")
    nig.add_argument("plan", type=Path, help="plan YAML (with an optional thresholds: section)")
    nig.add_argument("--store", type=Path, default=None)

    ben = sub.add_parser("bench", help="speed and memory per format against targets (writes reports/bench/)")
    ben.add_argument("--model", default="smollm2-135m")
    ben.add_argument("--formats", default=",".join(DEFAULT_FORMATS))
    ben.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ben.add_argument("--out", type=Path, default=env.REPO_ROOT / "reports" / "bench")
    # harness efficiency + one qeval run vs one lm-eval process per cell (qeval.bench.efficiency)
    ben.add_argument("--eval-formats", default="none,bnb-nf4", help="formats for the efficiency table ('' skips it)")
    ben.add_argument("--eval-scale", type=float, default=0.25, help="fraction of each default-suite task's limit")
    ben.add_argument("--per-cell", action=argparse.BooleanOptionalAction, default=True,
                     help="also time one fresh lm-eval process per cell (~2 min on 2 CPU cores)")

    sub.add_parser("formats", help="list the quantization formats")
    sub.add_parser("suites", help="list the shipped suites and tasks")
    sub.add_parser("setup", help="build the suite data and convert the embedded model (once)")
    return p


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of GiB, e.g. 4 or 2.5") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of GiB")
    return value * 2**30


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("qeval").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except QevalError as e:
        for line in str(e).splitlines():
            print(f"qeval: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qeval: interrupted; finished cells are stored, rerun to continue", file=sys.stderr)
        return 130


def _store_path(args) -> Path:
    return args.store or env.default_store_path()


def cmd_run(args) -> int:
    from qeval.runner import Plan, load_plan, run_plan
    from qeval.suites import suite_from_tasks

    plan = load_plan(args.plan) if args.plan else Plan()
    overrides = {}
    if args.model:
        overrides["models"] = (args.model,)
    if args.formats:
        overrides["formats"] = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    for name in ("suite", "device", "seed"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.tasks and args.suite:
        raise QevalError("--tasks", args.tasks, "either --tasks or --suite, not both", "drop one of them")
    if args.limit is not None and not args.tasks:
        raise QevalError("--limit", args.limit, "--tasks beside it (suites set their own limits)",
                         "add --tasks, or edit the suite's limit")
    plan = Plan(**{**plan.__dict__, **overrides})
    suite = None
    if args.tasks:
        suite = suite_from_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.limit,
                                 args.num_fewshot, args.batch_size)
    summary = run_plan(plan, _store_path(args), suite=suite)
    for line in summary.failed:
        print(f"qeval: failed: {line}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_report(args) -> int:
    from qeval.compare import (adapter_frames, decision, divergence_frame, history_frame, memory_frame,
                               paired_frame, results_frame, with_paired)
    from qeval.report import adapter_section, divergence_section, history_section, render
    from qeval.store import Store

    path = _store_path(args)
    if not path.is_file():
        raise QevalError("result store", str(path), "an existing store", "run `qeval run` first (or pass --store)")
    with Store(path) as store:
        records = list(store.records())
        pairs = paired_frame(records, store.samples)
        history = history_frame(store.runs("nightly"), store.get)
    meta = {
        "title": "qeval report", "store": str(path),
        "generated_at": datetime.now().isoformat(timespec="seconds"),
        "models": {r["model"]["spec"]: r["model"]["fingerprint"] for r in records},
        "versions": records[-1]["versions"] if records else env.versions(),
        "git_sha": ", ".join(sorted({r["git_sha"] for r in records})) or env.git_sha(),
        "devices": sorted({r["device_description"] for r in records}),
        "seed": ", ".join(sorted({str(r["seed"]) for r in records})), "cells": len(records),
    }
    memory = memory_frame(records)
    frames = adapter_frames(records)
    table, verdict = decision(frames, args.memory_budget)
    written = render(with_paired(results_frame(records), pairs), memory, meta, args.out,
                     extra=[divergence_section(divergence_frame(records, pairs)),
                            adapter_section(frames, table, verdict, memory), history_section(history)])
    for p in written:
        print(p)
    return 0


def cmd_nightly(args) -> int:
    from qeval.nightly import nightly

    res = nightly(args.plan, _store_path(args))
    print(f"nightly run {res.run_id}: {res.computed} computed, {res.reused} reused, {len(res.failed)} failed, "
          f"{sum(f.kind == 'regression' for f in res.findings)} regressions in {res.wall_s:.1f} s")
    for f in res.findings:
        print(f.line())
    for line in res.failed:
        print(f"COULD NOT RUN: {line}")
    return res.exit_code


def cmd_bench(args) -> int:
    from qeval.bench import bench, write

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        FORMATS.get(f)  # unknown names fail here, with the known ones listed
    device = env.resolve_device(args.device)
    frame = bench(args.model, formats, device)
    meta = (f"model {args.model}, device {env.device_description(device)}, git {env.git_sha()}, "
            + ", ".join(f"{k} {v}" for k, v in env.versions().items()))
    for p in write(frame, args.out, meta):
        print(p)
    eval_formats = [f.strip() for f in args.eval_formats.split(",") if f.strip()]
    if eval_formats:
        from qeval.bench import efficiency, per_cell, write_efficiency

        eff, noise = efficiency(args.model, eval_formats, device, scale=args.eval_scale)
        cells = per_cell(args.model, eval_formats, scale=args.eval_scale) if args.per_cell and device == "cpu" else None
        with (args.out / "bench.md").open("a") as fh:
            fh.write(write_efficiency(eff, noise, cells, args.out))
    print((args.out / "bench.md").read_text())
    return 0


def cmd_formats(args) -> int:
    for name, f in FORMATS.items():
        bits = f"{f.bits_per_weight(576):.3f} bits/weight" if f.bits_per_weight else "full precision"
        print(f"{name:12s} {bits:20s} {f.description}")
    return 0


def cmd_suites(args) -> int:
    from qeval.suites import load_suite, shipped_suites, shipped_tasks

    for name in shipped_suites():
        s = load_suite(name)
        tasks = ", ".join(f"{t.task} (limit {t.limit})" for t in s.tasks)
        print(f"{name:10s} {s.description}\n{'':10s} tasks: {tasks}")
    print("shipped tasks: " + ", ".join(shipped_tasks()) + "; online, any lm-eval task name works too")
    return 0


def cmd_setup(args) -> int:
    from qeval.models import DEFAULT_MODEL, resolve_model
    from qeval.suite_data import build_all

    for name, entry in build_all().items():
        print(f"suite data {name}: {entry['rows']} rows (sha256 {entry['sha256'][:12]})")
    m = resolve_model(DEFAULT_MODEL)
    print(f"model {m.spec}: {m.path} (fingerprint {m.fingerprint[:12]})")
    return 0


COMMANDS = {"run": cmd_run, "nightly": cmd_nightly, "bench": cmd_bench, "report": cmd_report, "formats": cmd_formats, "suites": cmd_suites, "setup": cmd_setup}

if __name__ == "__main__":
    sys.exit(main())
