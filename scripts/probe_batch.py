"""Probe: evaluate() wall time of each task of a suite at candidate batch sizes, interleaved,
median of `--repeats`; prints the fastest per task (what suites/default.yaml ships for CPU).

  PYTHONPATH=. python scripts/probe_batch.py --threads 1 --repeats 3 --scale 0.5
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = {"loglikelihood_rolling": [1, 4, 8, 16], "multiple_choice": [16, 32, 64, 128],
              "generate_until": [16, 32, 64]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--format", default="none")
    ap.add_argument("--suite", default="default")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from qeval.bench.speed import scaled_tasks
    from qeval.eval.evaluate import EvalSpec, task_manager, evaluate
    from qeval.models.load import load_model, resolve_model
    from qeval.quant.formats import FORMATS

    loaded = load_model(resolve_model(args.model), FORMATS.get(args.format), args.device)
    spec = EvalSpec(bootstrap_iters=10)
    for t in scaled_tasks(args.suite, args.scale):
        kind = task_manager(False).load([t.task])  # noqa: F841 (warm the index)
        out = evaluate(loaded, dataclasses.replace(t, divergence=False), spec)  # warm-up + task type
        kind = out.config.get("output_type")
        cands = CANDIDATES.get(kind, [t.batch_size])
        times: dict[int, list[float]] = {b: [] for b in cands}
        for rep in range(args.repeats):
            for b in (cands if rep % 2 == 0 else cands[::-1]):
                t0 = time.perf_counter()
                evaluate(loaded, dataclasses.replace(t, batch_size=b, divergence=False), spec)
                times[b].append(time.perf_counter() - t0)
        med = {b: statistics.median(v) for b, v in times.items()}
        best = min(med, key=med.get)
        print(f"{t.task:18s} {kind:22s} " + "  ".join(f"bs{b}={med[b]:.2f}s" for b in cands) + f"  -> {best}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
