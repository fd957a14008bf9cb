"""Before/after timing of the evaluation part of a plan, interleaved in one process.

`old`: lm-eval's stock HFLM (full logits at every position, divergence by module hooks, documents
tokenized per arm, data files parsed per evaluation, lm-eval's environment report and template
compilation on every call) with the batch sizes of the suite as it was (OLD_BATCH); `new`: qeval.eval.lm.QevalLM
with the suite's batch sizes. Per format the model is loaded once; every task runs old and new in
alternating order, `--repeats` times; medians are printed. The first arm of each pair pays the
tokenization for both in `old` (stock HFLM caches nothing), so `new` runs are measured on a warm
token cache only from the second format on, as in a real run (arms after the first).

  PYTHONPATH=. python scripts/eval_speed.py --formats none bnb-nf4 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

OLD_BATCH = {"qeval_analogy": 32, "qeval_lee_ppl": 1, "qeval_capitals": 16, "qeval_similarity": 32}  # suite before issue 14


def stock_lm():
    from lm_eval.models.huggingface import HFLM

    class Stock(HFLM):  # what evaluate() constructed before QevalLM
        def __init__(self, *a, observer=None, recorder=None, **kw):
            super().__init__(*a, **kw)
            self._split = None  # evaluate() then captures divergence with module hooks, as before

    return Stock


def clear_data_cache() -> None:
    for name, mod in list(sys.modules.items()):
        if name.endswith("qeval_data") and hasattr(mod, "_CACHE"):
            mod._CACHE.clear()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", nargs="+", default=["none", "bnb-nf4"])
    ap.add_argument("--suite", default="default")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--limit-scale", type=float, default=1.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU seconds (with --threads 1, robust to other load on the machine)")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import qeval.eval.evaluate
    import qeval.eval.lm
    from qeval.eval.divergence import Reference
    from qeval.eval.evaluate import EvalSpec, evaluate
    from qeval.models.load import load_model, resolve_model
    from qeval.quant.formats import FORMATS
    from qeval.eval.suites import load_suite

    New, Old = qeval.eval.lm.QevalLM, stock_lm()
    suite = load_suite(args.suite)
    tasks = [dataclasses.replace(t, limit=max(1, int((t.limit or 50) * args.limit_scale))) for t in suite.tasks]
    r = resolve_model(args.model)
    times = {}  # (mode, fmt, task) -> [s]
    values = {}
    refs: dict = {}
    for fmt in args.formats:
        loaded = load_model(r, FORMATS.get(fmt), "cpu")
        for rep in range(args.repeats):
            for t in tasks:
                order = ("old", "new") if rep % 2 == 0 else ("new", "old")
                for mode in order:
                    qeval.eval.lm.QevalLM = Old if mode == "old" else New
                    task = t if mode == "new" else dataclasses.replace(t, batch_size=OLD_BATCH.get(t.task, t.batch_size))
                    div = None
                    if t.divergence:
                        div = refs.get((mode, t.task), "reference")
                    qeval.eval.evaluate._FAST_PATHS = mode == "new"
                    if mode == "old":
                        clear_data_cache()  # the old helper read the data file on every evaluation
                    clock = time.process_time if args.clock == "cpu" else time.perf_counter
                    t0 = clock()
                    out = evaluate(loaded, task, EvalSpec(), div)
                    dt = clock() - t0
                    if mode == "old":
                        clear_data_cache()  # and left nothing behind for the next arm
                    if out.reference is not None:
                        refs[(mode, t.task)] = out.reference
                    times.setdefault((mode, fmt, t.task), []).append(dt)
                    values[(mode, fmt, t.task)] = (out.metrics[out.primary].value,
                                                   out.divergence.kl_mean if out.divergence else None)
                    print(f"{fmt:8s} {t.task:18s} {mode} bs={task.batch_size:<3} {dt:7.2f} s "
                          f"{out.primary}={out.metrics[out.primary].value:.6g}"
                          + (f" kl={out.divergence.kl_mean:.3e}" if out.divergence else ""), flush=True)
        del loaded
    qeval.eval.lm.QevalLM = New
    print("\n| format | task | old s (median) | new s (median) | speedup | old value | new value |")
    print("|---|---|---:|---:|---:|---:|---:|")
    tot = {"old": 0.0, "new": 0.0}
    for fmt in args.formats:
        for t in tasks:
            o, n = (statistics.median(times[(m, fmt, t.task)]) for m in ("old", "new"))
            tot["old"] += o
            tot["new"] += n
            print(f"| {fmt} | {t.task} | {o:.2f} | {n:.2f} | {o / n:.2f}x | {values[('old', fmt, t.task)][0]:.6g} | "
                  f"{values[('new', fmt, t.task)][0]:.6g} |")
    print(f"| all | all | {tot['old']:.2f} | {tot['new']:.2f} | {tot['old'] / tot['new']:.2f}x | | |")
    if args.json:
        json.dump({"times": {"|".join(k): v for k, v in times.items()}}, open(args.json, "w"), indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
