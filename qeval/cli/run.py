"""`qeval run`: evaluate a model at several formats (only the missing cells)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from qeval.cli.base import Command, QevalError, comma_list, console, register, store_path
from qeval.core import env
from qeval.core.names import EXIT_OK, EXIT_REGRESSION
from qeval.run.plan import plan_keys  # the plan's schema (no torch): `run --help` lists its keys from it

EPILOG = """examples:
  qeval run                                   # the baseline + 5 bitsandbytes formats of the embedded model, default suite
  qeval run --formats none,bnb-nf4 --suite smoke
  qeval run --model ./my-hf-folder --tasks qeval_analogy --limit 100
  qeval run --model meta-llama/Llama-3.2-1B --tasks hellaswag   # online: any hub id, any lm-eval task
  qeval run --plan plan.yaml && qeval report
"""


def arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--plan", type=Path, help=f"plan YAML (keys: {', '.join(plan_keys())}; see "
                     "docs/plan-reference.md); other flags override it")
    run.add_argument("--model", help="embedded name (smollm2-135m), HF folder, .gguf file, or hub id "
                     "(online only); default smollm2-135m")
    run.add_argument("--formats", help="comma-separated format names (see `qeval formats`); default: none + the five bitsandbytes presets")
    run.add_argument("--suite", help="shipped suite name (see `qeval suites`) or suite YAML path; default: default")
    run.add_argument("--tasks", help="comma-separated lm-eval task names instead of a suite")
    run.add_argument("--include-path", action="append", type=Path, metavar="DIR", default=None,
                     help="folder with your own lm-eval task YAML (repeatable); adds to the plan's include_path. "
                     "It is code: lm-eval imports the modules its `!function` tags name, here and on Ray workers; "
                     "qeval refuses a tag or include: that reaches outside the folders you name (docs/tasks-and-mirrors.md)")
    run.add_argument("--limit", type=int, help="with --tasks: documents per task (default: all)")
    run.add_argument("--num-fewshot", type=int, default=0, help="with --tasks: few-shot examples (default 0)")
    run.add_argument("--batch-size", type=int, default=1, help="with --tasks: batch size (default 1)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: cuda if available")
    run.add_argument("--compute-dtype", choices=["auto", "float32", "bf16"],
                     help="auto (default): float32 on CPU, bf16 on CUDA; bf16 on a CPU with native bf16 only")
    run.add_argument("--seed", type=int)
    run.add_argument("--executor", help="where jobs run: local (default, this process) or ray (needs qeval[ray]); "
                     "overrides the plan's executor:")
    run.add_argument("--address", help="with --executor ray: a running cluster (auto, or ray://host:10001); "
                     "default: start a local Ray")
    run.add_argument("--store", type=Path, default=None, help=f"result store (default {env.default_store_path()}, "
                     "or $QEVAL_STORE)")


def cmd_run(args) -> int:
    with console(args) as progress:  # from the heavy imports on: their warnings go to the log
        summary = _run(args, progress)
    for line in summary.failed:
        print(f"qeval: failed: {line}", file=sys.stderr)
    return EXIT_REGRESSION if summary.failed else EXIT_OK  # 1: some cells failed


def _run(args, progress):
    from qeval.eval.suites import suite_from_tasks
    from qeval.run.driver import run_plan
    from qeval.run.plan import Plan, load_plan

    plan = load_plan(args.plan) if args.plan else Plan()
    overrides = {}
    if args.model:
        overrides["models"] = (args.model,)
    if args.formats is not None:
        overrides["formats"] = tuple(comma_list(args.formats))
        if not overrides["formats"]:
            raise QevalError("--formats", args.formats, "one or more comma-separated format names",
                             "e.g. --formats none,bnb-nf4 (`qeval formats` lists them); leave it out for none + the five bitsandbytes presets")
    if args.include_path:
        overrides["include_path"] = tuple(str(p) for p in args.include_path) + tuple(
            [plan.include_path] if isinstance(plan.include_path, str) else plan.include_path)
    for name in ("suite", "device", "seed", "compute_dtype", "executor"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.address is not None:
        if (overrides.get("executor") or plan.executor) != "ray":
            raise QevalError("--address", args.address, "--executor ray beside it", "add --executor ray")
        overrides["ray"] = dataclasses.replace(plan.ray, address=args.address)
    if args.tasks and args.suite:
        raise QevalError("--tasks", args.tasks, "either --tasks or --suite, not both", "drop one of them")
    if args.limit is not None and not args.tasks:
        raise QevalError("--limit", args.limit, "--tasks beside it (suites set their own limits)",
                         "add --tasks, or edit the suite's limit")
    plan = dataclasses.replace(plan, **overrides)
    suite = None
    if args.tasks is not None:
        from qeval.eval.suites import include_paths

        paths = include_paths(plan.include_path, None, "--include-path")
        suite = suite_from_tasks(comma_list(args.tasks), args.limit, args.num_fewshot, args.batch_size, paths)
    return run_plan(plan, store_path(args), suite=suite, progress=progress)


register(Command("run", "evaluate a model at several formats (only missing cells)", cmd_run, arguments,
                 dict(formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)))
