"""`qeval bench`: speed and memory per format against targets (writes reports/bench/)."""
from __future__ import annotations

import argparse
from pathlib import Path

from qeval.cli.base import Command, QevalError, comma_list, fraction, register
from qeval.core import env


def arguments(ben) -> None:
    ben.add_argument("--model", default="smollm2-135m")
    ben.add_argument("--formats", help="comma-separated format names; default: the default plan's six")
    ben.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ben.add_argument("--out", type=Path, default=None, help="default ./reports/bench (or $QEVAL_HOME/reports/bench)")
    # harness efficiency + one qeval run vs one lm-eval process per cell (qeval.bench.speed.efficiency)
    ben.add_argument("--eval-formats", default="none,bnb-nf4", help="formats for the efficiency table ('' skips it)")
    ben.add_argument("--eval-scale", type=fraction, default=0.25, help="fraction of each default-suite task's limit")
    ben.add_argument("--compute-dtype", choices=["auto", "float32", "bf16"], default="auto",
                     help="dtype of the efficiency table; with bf16 also its noise floor against float32")
    ben.add_argument("--per-cell", action=argparse.BooleanOptionalAction, default=True,
                     help="also time one fresh lm-eval process per cell (~2 min on 2 CPU cores)")
    ben.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                     help="the training-efficiency table: the default plan's adapters (qeval.bench.training)")
    ben.add_argument("--train-steps", type=int, default=5, help="timed steps per adapter and checkpointing setting")


def cmd_bench(args) -> int:
    from qeval.bench.speed import bench, write
    from qeval.quant.formats import DEFAULT_FORMATS, FORMATS  # here, not at --help time

    out = args.out or env.home() / "reports" / "bench"
    formats = list(DEFAULT_FORMATS) if args.formats is None else comma_list(args.formats)
    eval_formats = comma_list(args.eval_formats)
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
    if args.train:
        import os

        from qeval.bench.training import plan_arms, train_bench, write_training

        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        table = write_training(train_bench(args.model, plan_arms(env.PACKAGE_ROOT.parent / "plans" / "default.yaml"),
                                           device, steps=args.train_steps), out, load)
        with (out / "bench.md").open("a") as fh:
            fh.write(table)
    print((out / "bench.md").read_text())
    return 0


register(Command("bench", "speed and memory per format against targets (writes reports/bench/)", cmd_bench,
                 arguments))
