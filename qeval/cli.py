"""qeval's command line: `qeval run`, `qeval report`, `qeval nightly`, `qeval gc`, `qeval formats`,
`qeval suites`, `qeval setup`.

Exit codes: 0 success; 1 failed cells (run) or a regression (nightly); 2 bad input -- one line on
stderr per problem (the value, what was expected, the fix), nothing written; 3 qeval could not
finish (a lock held too long, an internal error: one line, the traceback with -v or QEVAL_DEBUG=1).
Heavy libraries (torch, transformers, lm-eval) are imported inside the commands that need them, so
`qeval --help` and `qeval --version` answer at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import traceback
from pathlib import Path

from qeval import __version__
from qeval.core import env
from qeval.core.console import StderrHandler, log_path, session
from qeval.core.errors import QevalError
from qeval.core.names import EXIT_BAD_INPUT, EXIT_COULD_NOT_RUN, EXIT_OK, EXIT_REGRESSION
from qeval.run.plan import plan_keys  # the plan's schema (no torch): `run --help` lists its keys from it

EPILOG = """examples:
  qeval run                                   # the baseline + 5 bitsandbytes formats of the embedded model, default suite
  qeval run --formats none,bnb-nf4 --suite smoke
  qeval run --model ./my-hf-folder --tasks qeval_analogy --limit 100
  qeval run --model meta-llama/Llama-3.2-1B --tasks hellaswag   # online: any hub id, any lm-eval task
  qeval run --plan plan.yaml && qeval report
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other user error (exit 2)."""

    def error(self, message: str):
        print(f"qeval: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="qeval", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Measure what quantization costs an LLM: accuracy per task, bytes, time. "
                    "Results go to a SQLite store (computed once, reused on reruns); reports are "
                    "rendered from the store.")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs and tracebacks")
    p.add_argument("--version", action="version", version=f"qeval {__version__}")
    # -v after the subcommand too (`qeval run -v`): SUPPRESS keeps a subparser from resetting it
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show library logs and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)  # every subcommand accepts -v

    run = command("run", help="evaluate a model at several formats (only missing cells)",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    run.add_argument("--plan", type=Path, help=f"plan YAML (keys: {', '.join(plan_keys())}; see "
                     "docs/plan-reference.md); other flags override it")
    run.add_argument("--model", help="embedded name (smollm2-135m), HF folder, .gguf file, or hub id "
                     "(online only); default smollm2-135m")
    run.add_argument("--formats", help="comma-separated format names (see `qeval formats`); default: none + the five bitsandbytes presets")
    run.add_argument("--suite", help="shipped suite name (see `qeval suites`) or suite YAML path; default: default")
    run.add_argument("--tasks", help="comma-separated lm-eval task names instead of a suite")
    run.add_argument("--include-path", action="append", type=Path, metavar="DIR", default=None,
                     help="folder with your own lm-eval task YAML (repeatable); adds to the plan's include_path")
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

    rep = command("report", help="render reports/latest/ from the store")
    rep.add_argument("--store", type=Path, default=None)
    rep.add_argument("--out", type=Path, default=None,
                     help="output folder (default ./reports/latest, or $QEVAL_HOME/reports/latest)")
    rep.add_argument("--memory-budget", type=_gib, metavar="GIB",
                     help="training memory you have, in GiB: the LoRA-vs-QLoRA verdict picks within it")
    rep.add_argument("--plan", type=Path, help="take the minimum meaningful effects and the FDR level from this "
                     "plan's thresholds: section (default: the built-in defaults)")

    nig = command("nightly", help="run a plan as a nightly regression job (exit 1 on regression)",
                         description="Run PLAN incrementally, record the run, compare every cell and metric with the "
                                     "previous nightly run (exact McNemar / paired t on log-likelihoods, "
                                     "Benjamini-Hochberg FDR over the run, minimum meaningful effects) and with the "
                                     "plan's thresholds. A regression stays open until fixed or acknowledged "
                                     "(--ack CELL --reason TEXT). Exit 0 clean, 1 regression, 2 bad input, "
                                     "3 could not finish.")
    nig.add_argument("plan", type=Path, help="plan YAML (with an optional thresholds: section)")
    nig.add_argument("--store", type=Path, default=None)
    nig.add_argument("--ack", metavar="CELL", help="acknowledge the open regressions of CELL (as printed, e.g. "
                     "'bnb-nf4 / qeval_capitals') instead of running; needs --reason")
    nig.add_argument("--reason", help="why the regression is accepted (recorded in the store's history)")
    nig.add_argument("--candidate", action="store_true",
                     help="run in a candidate environment (newer libraries, `make nightly-upgrade`): recorded as a "
                          "'candidate' run and compared with the last nightly of the locked environment; the "
                          "nightly history and its open regressions are left alone")

    bg = command("bench-gates", help="false alarms and detection of the nightly gates, simulated on a store")
    bg.add_argument("--store", type=Path, default=None, help="a store holding the default plan's results")
    bg.add_argument("--nights", type=_positive_int, default=1000)
    bg.add_argument("--plan", type=Path, default=Path("plans/default.yaml"),
                    help="the plan whose gates are simulated (default plans/default.yaml)")
    bg.add_argument("--out", type=Path, default=None, help="default ./reports/bench (or $QEVAL_HOME/reports/bench)")

    ben = command("bench", help="speed and memory per format against targets (writes reports/bench/)")
    ben.add_argument("--model", default="smollm2-135m")
    ben.add_argument("--formats", help="comma-separated format names; default: the default plan's six")
    ben.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ben.add_argument("--out", type=Path, default=None, help="default ./reports/bench (or $QEVAL_HOME/reports/bench)")
    # harness efficiency + one qeval run vs one lm-eval process per cell (qeval.bench.speed.efficiency)
    ben.add_argument("--eval-formats", default="none,bnb-nf4", help="formats for the efficiency table ('' skips it)")
    ben.add_argument("--eval-scale", type=_fraction, default=0.25, help="fraction of each default-suite task's limit")
    ben.add_argument("--compute-dtype", choices=["auto", "float32", "bf16"], default="auto",
                     help="dtype of the efficiency table; with bf16 also its noise floor against float32")
    ben.add_argument("--per-cell", action=argparse.BooleanOptionalAction, default=True,
                     help="also time one fresh lm-eval process per cell (~2 min on 2 CPU cores)")

    gcp = command("gc", help="delete cached references and adapters that no stored record uses",
                         description="List (and unless --dry-run delete) divergence references and adapter "
                                     "artifacts in the cache that no record in the store refers to; prints sizes.")
    gcp.add_argument("--store", type=Path, default=None)
    gcp.add_argument("--dry-run", action="store_true", help="only list what would be deleted")

    pm = command("plan-memory", help="which of LoRA / QLoRA / full fine-tune fits a GPU, from a model's config.json",
                 description="Predict peak training memory (qeval.train.estimate: weights, adapter + AdamW, "
                             "gradients, activations with gradient checkpointing, bf16 compute) for a model "
                             "config and say what fits a GPU of --gpu GiB.")
    pm.add_argument("--config", required=True,
                    help="a hub-style config.json (or its folder), or a shipped shape: " + ", ".join(_shipped_configs()))
    pm.add_argument("--gpu", type=_number(float, lambda x: x > 0, "a positive GPU size in GiB"), nargs="+",
                    default=[16.0, 24.0, 48.0, 80.0], help="GPU memory in GiB (default: 16 24 48 80)")
    pm.add_argument("--batch-size", type=_positive_int, default=1)
    pm.add_argument("--seq-len", type=_positive_int, default=2048)
    pm.add_argument("--r", type=_positive_int, default=16, help="LoRA rank (all linear layers)")
    command("formats", help="list the quantization formats")
    command("suites", help="list the shipped suites and tasks")
    ps = command("setup", help="build the suite data and convert the embedded model (once)")
    ps.add_argument("--backend", choices=["gguf-k", "gptq"], action="append", default=[],
                    help="instead: set up an optional backend (repeatable). gguf-k: llama.cpp's ggml library "
                         "for the GGUF K-quants (pip download of the llama-cpp-python source + cmake, ~1 min); "
                         "gptq: a venv under the cache with gptqmodel and torch pinned (minutes, needs the "
                         "package index)")
    return p


def _number(parse, ok, expected: str):
    """An argparse type: `parse` the text, check it with `ok`, else one line naming the value and
    what was expected."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value
    return convert


_positive_int = _number(int, lambda v: v >= 1, "a whole number, 1 or more (e.g. 1000)")
_fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1], e.g. 0.25")
_positive_gib = _number(float, lambda v: v > 0, "a positive number of GiB, e.g. 4 or 2.5")


def _gib(text: str) -> float:
    return _positive_gib(text) * 2**30


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the log's run header
    verbose = bool(getattr(args, "verbose", False))
    debug = verbose or bool(os.environ.get("QEVAL_DEBUG"))
    _setup_logging(verbose)
    try:
        return COMMANDS[args.command](args)
    except QevalError as e:
        for line in str(e).splitlines():
            print(f"qeval: error: {line}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return getattr(e, "exit_code", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("qeval: interrupted; finished cells are stored, rerun to continue", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug or an unforeseen environment: 3, never 1 ("regression")
        if debug:
            traceback.print_exc()
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"qeval: could not finish: internal error: {type(e).__name__}: {msg}; "
              "rerun with -v/QEVAL_DEBUG=1 for the traceback",
              file=sys.stderr)
        return EXIT_COULD_NOT_RUN


def _setup_logging(verbose: bool) -> None:
    """qeval's own progress at INFO; library logs only with -v (run and nightly: in the log beside the
    store, `_console`). Configured per main() call (not frozen at first use, not muted for good), so
    -v in a later call takes effect."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, StderrHandler)]:
        root.removeHandler(h)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("qeval").setLevel(logging.DEBUG if verbose else logging.INFO)
    # bitsandbytes warns on every int8 matmul that fp32 inputs are cast to fp16 (documented
    # behaviour of the format, thousands of times a run): shown with -v only
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET if verbose else logging.ERROR)


def _store_path(args) -> Path:
    return args.store or env.default_store_path()


def _console(args):
    """qeval's lines and one progress bar on the terminal; library output in qeval.log beside the
    store (on the terminal with -v)."""
    return session(log_path(_store_path(args)), bool(getattr(args, "verbose", False)),
                   f"qeval {__version__}: qeval " + " ".join(args.argv))


def cmd_run(args) -> int:
    with _console(args) as console:  # from the heavy imports on: their warnings go to the log
        summary = _run(args, console)
    for line in summary.failed:
        print(f"qeval: failed: {line}", file=sys.stderr)
    return EXIT_REGRESSION if summary.failed else EXIT_OK  # 1: some cells failed


def _run(args, console):
    from qeval.eval.suites import suite_from_tasks
    from qeval.run.driver import run_plan
    from qeval.run.plan import Plan, load_plan

    plan = load_plan(args.plan) if args.plan else Plan()
    overrides = {}
    if args.model:
        overrides["models"] = (args.model,)
    if args.formats is not None:
        overrides["formats"] = tuple(f.strip() for f in args.formats.split(",") if f.strip())
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
        suite = suite_from_tasks([t.strip() for t in args.tasks.split(",") if t.strip()], args.limit,
                                 args.num_fewshot, args.batch_size, paths)
    return run_plan(plan, _store_path(args), suite=suite, progress=console)


def cmd_report(args) -> int:
    from qeval.report.build import build_report

    out = args.out or env.default_report_dir()
    bad = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if bad is not None:
        raise QevalError("--out", str(out), "a folder (or a path where one can be created)",
                         f"{bad} is a file; pass another --out")
    for p in build_report(_store_path(args), out, plan=args.plan, memory_budget=args.memory_budget):
        print(p)
    return 0


LOCK_FILE = "requirements-lock.txt"  # the known-good environment `make` installs (Makefile LOCK)


def cmd_nightly(args) -> int:
    from qeval.store.store import check_store_path

    if args.reason and not args.ack:
        raise QevalError("--reason", args.reason, "--ack CELL beside it", "add --ack with the cell to acknowledge")
    if args.ack:
        from qeval.gates.nightly import acknowledge

        ids = acknowledge(_store_path(args), args.ack, args.reason or "")
        print(f"acknowledged {len(ids)} open regression(s) of {args.ack}: {args.reason}")
        return 0
    check_store_path(_store_path(args), write=True)
    drift = env.lock_drift(Path(LOCK_FILE))
    if drift:
        label = "candidate environment" if args.candidate else "warning: not the locked environment"
        print(f"{label}: " + ", ".join(f"{k} {locked} -> {now}" for k, (locked, now) in drift.items())
              + f" (vs {LOCK_FILE})", file=sys.stderr)
    # an unexpected exception is "could not finish" (exit 3, one line: main()), never "regression";
    # nightly() marks its run failed before it propagates
    with _console(args) as console:
        from qeval.gates.nightly import nightly  # here: the warnings of its imports go to the log

        res = nightly(args.plan, _store_path(args), progress=console,
                      run_kind="candidate" if args.candidate else "nightly", compare_with="nightly")
    print(f"{'candidate' if args.candidate else 'nightly'} run {res.run_id}: {res.computed} computed, {res.reused} reused, {len(res.failed)} failed, "
          f"{sum(f.kind == 'regression' for f in res.findings)} regressions in {res.wall_s:.1f} s; "
          f"{res.method or 'no comparisons'}")
    for f in res.findings:
        print(f.line())
    for line in res.failed:
        print(f"COULD NOT RUN: {line}")
    return res.exit_code


def cmd_bench_gates(args) -> int:
    from qeval.gates.bench_gates import run

    text = run(args.store or env.default_store_path(), args.out or env.home() / "reports" / "bench",
               nights=args.nights, plan_path=args.plan)
    print(text)
    return 0


def cmd_bench(args) -> int:
    from qeval.bench.speed import bench, write
    from qeval.quant.formats import FORMATS

    out = args.out or env.home() / "reports" / "bench"
    from qeval.quant.formats import DEFAULT_FORMATS # resolved here, not at --help time: qeval.quant imports torch

    formats = list(DEFAULT_FORMATS) if args.formats is None else [f.strip() for f in args.formats.split(",") if f.strip()]
    eval_formats = [f.strip() for f in args.eval_formats.split(",") if f.strip()]
    if not formats:
        raise QevalError("--formats", args.formats, "at least one format name", "e.g. --formats none,bnb-nf4")
    for f in formats + eval_formats:
        FORMATS.get(f)  # unknown names fail here, before any measurement, with the known ones listed
    device = env.resolve_device(args.device)
    from qeval.models.load import compute_dtype, compute_dtype_problem

    if problem := compute_dtype_problem(args.compute_dtype, device):
        raise problem
    dtype = compute_dtype(device, args.compute_dtype)
    frame = bench(args.model, formats, device)
    meta = (f"model {args.model}, device {env.device_description(device)}, git {env.git_sha()}, "
            + ", ".join(f"{k} {v}" for k, v in env.versions().items()))
    for p in write(frame, out, meta):
        print(p)
    if eval_formats:
        from qeval.bench.speed import efficiency, per_cell, write_efficiency

        eff, noise = efficiency(args.model, eval_formats, device, scale=args.eval_scale, dtype=dtype)
        cells = per_cell(args.model, eval_formats, scale=args.eval_scale) \
            if args.per_cell and device == "cpu" and args.compute_dtype == "auto" else None
        with (out / "bench.md").open("a") as fh:
            fh.write(write_efficiency(eff, noise, cells, out))
    if dtype != compute_dtype("cpu"):  # bf16 (CPU or CUDA): what it moves against float32
        from qeval.bench.speed import dtype_floor, write_dtype_floor

        with (out / "bench.md").open("a") as fh:
            fh.write(write_dtype_floor(dtype_floor(args.model, device, dtype)))
    print((out / "bench.md").read_text())
    return 0


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


def cmd_setup(args) -> int:
    if args.backend:  # only the named backends' parts, not the suite data or the model
        if "gguf-k" in args.backend:
            from qeval.quant.backends import ggml_lib

            ggml_lib.build()
        if "gptq" in args.backend:
            from qeval.quant.backends.gptq import setup_env

            print(f"gptq env: {setup_env()}")
        return 0
    from qeval.models.load import DEFAULT_MODEL, resolve_model
    from qeval.data.suite_data import build_all

    for name, entry in build_all().items():
        print(f"suite data {name}: {entry['rows']} rows (sha256 {entry['sha256'][:12]})")
    m = resolve_model(DEFAULT_MODEL)
    print(f"model {m.spec}: {m.path} (fingerprint {m.fingerprint[:12]})")
    return 0


def _shipped_configs() -> list[str]:
    return sorted(p.stem for p in (env.PACKAGE_DATA / "configs").glob("*.json"))


def cmd_plan_memory(args) -> int:
    import json as _json

    from qeval.train.estimate import Shape, fits_table

    path = Path(args.config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() and args.config in _shipped_configs():
        path = env.PACKAGE_DATA / "configs" / f"{args.config}.json"
    if not path.is_file():
        from qeval.core.errors import unknown_name

        raise unknown_name("--config", args.config, _shipped_configs(), "or the path of a config.json")
    try:
        cfg = _json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QevalError("--config", str(path), f"a JSON config ({e})", "pass a model's config.json") from None
    shape = Shape.from_config(cfg)
    print(f"{args.config}: {shape.params / 1e9:.2f} B parameters ({shape.layers} layers, hidden {shape.hidden}); "
          f"batch {args.batch_size} x seq_len {args.seq_len}, LoRA r={args.r} on all linear layers, bf16 compute, "
          "gradient checkpointing, AdamW; QLoRA on NF4 + double quant; full fine-tune with fp32 master weights")
    for gpu in args.gpu:
        rows = fits_table(shape, gpu, args.batch_size, args.seq_len, args.r)
        print(f"\nGPU {gpu:g} GiB:")
        print(f"{'method':8} {'weights':>9} {'adapter+opt':>12} {'grads':>8} {'activations':>12} {'total GiB':>10}  fits")
        for r in rows:
            print(f"{r['method']:8} {r['weights_gib']:9.2f} {r['adapter_optimizer_gib']:12.2f} {r['gradients_gib']:8.2f} "
                  f"{r['activations_gib']:12.2f} {r['total_gib']:10.2f}  {'yes' if r['fits'] else 'no'}")
    return 0


def cmd_gc(args) -> int:
    from qeval.store.gc import collect

    return collect(_store_path(args), dry_run=args.dry_run)


COMMANDS = {"gc": cmd_gc, "run": cmd_run, "nightly": cmd_nightly, "bench-gates": cmd_bench_gates, "bench": cmd_bench, "report": cmd_report, "formats": cmd_formats, "suites": cmd_suites, "setup": cmd_setup, "plan-memory": cmd_plan_memory}

if __name__ == "__main__":
    sys.exit(main())
