"""`qeval bench`'s training table: each adapter of a plan trained for a few steps, against the
forward throughput of the same model measured in the same run (issue 24).

A training step costs about three forwards (the forward, and a backward of about twice its work),
four with gradient checkpointing (each block's forward runs again in backward), so the ceiling is
the no-grad forward's tokens/s divided by 3 (by 4 with checkpointing); efficiency = training
tokens/s / that ceiling. The step is split at explicit boundaries (`qeval.train.recipe.train_step`'s
clock): forward (the loss), backward, optimizer (clip, AdamW, schedule, zero), and the rest: the
batch's indexing and copies, and the held-out passes spread over the steps as the recipe runs
them (one pass every `eval_every` steps). Both checkpointing settings run for every arm: turning
it off changes the memory, not the trained weights (tests/test_adapters.py).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import pandas as pd

from qeval.core.files import atomic_write

EFFICIENCY_TARGET = 0.75
STEPS, FORWARD_REPEATS = 5, 3  # timed steps (after one warm-up step) and no-grad forwards per arm


def plan_arms(plan_path: Path) -> dict:
    """The plan's adapters (name -> AdapterSpec): the default plan's LoRA on the float base and QLoRA on NF4."""
    from qeval.run.plan import load_plan

    return dict(load_plan(plan_path).adapters)


def train_bench(model_spec: str, adapters: dict, device: str, steps: int = STEPS,
                settings: tuple = (True, False), isolate: bool = True) -> pd.DataFrame:
    """One row per (adapter, checkpointing): tokens/s, the forward's, efficiency and the step's split.

    With `isolate` (the default) each row is measured in its own process the way the recipe's
    training child runs after its measured window: allocator tuned, then relaxed
    (qeval.models.memory.relax_allocator). In this process (`isolate=False`) the allocator is the
    bench's own. Under the child's measuring allocator (every block of 1 MiB or more mapped afresh)
    LoRA with checkpointing stepped in 8.5 s here against 5.1 s with glibc's defaults: the table
    once said checkpointing cost no speed because it was measured outside the child."""
    import json
    import tempfile

    from qeval.train.child import run_in_child

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in adapters.items():
            for ckpt in settings:
                out = Path(tmp) / f"{name}-{ckpt}.json"
                args = (model_spec, name, spec, device, steps, ckpt, out, isolate)
                run_in_child(_bench_one, args) if isolate else _bench_one(*args)
                rows.append(json.loads(out.read_text()))
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["meets_target"] = (frame.efficiency >= EFFICIENCY_TARGET) & (frame.heldout_efficiency >= EFFICIENCY_TARGET)
    return frame


def _bench_one(model_spec: str, name: str, spec, device: str, steps: int, ckpt: bool, out: Path,
               child: bool) -> None:
    """One (adapter, checkpointing) row, written to `out` as JSON; `child`: it runs in a training
    child (its allocator is then relaxed as the recipe's is; the caller's is never touched)."""
    import json

    import torch

    from qeval.data.train_data import prepare
    from qeval.models.load import load_model, resolve_model
    from qeval.models.memory import allocator_description, relax_allocator
    from qeval.quant.formats import FORMATS
    from qeval.train.loss import causal_lm_loss
    from qeval.train.recipe import heldout_loss_of, optimizer, train_step, trainable

    # the recipe's steady state: it relaxes its measuring allocator after the first held-out pass
    # that follows training steps (qeval.train.recipe), so most of `qeval run`'s steps run like this
    if child:
        relax_allocator()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.manual_seed(spec.seed)
    base = load_model(resolve_model(model_spec), FORMATS.get(spec.train_quant), device)
    net = trainable(base.model, spec, ckpt)
    params = [p for p in net.parameters() if p.requires_grad]
    train, held, _ = prepare(spec.train_data, base.tokenizer, spec.seq_len, spec.packing)
    opt, sched = optimizer(params, spec)
    tokens = spec.batch_size * spec.seq_len
    batch = lambda step: [(step * spec.batch_size + i) % len(train.ids) for i in range(spec.batch_size)]  # noqa: E731
    ids, labels = train.ids[batch(0)].to(device), train.labels[batch(0)].to(device)
    net.eval()
    fwd = []
    with torch.no_grad():
        causal_lm_loss(net, ids, labels, spec.cross_entropy)  # warm-up
        for _ in range(FORWARD_REPEATS):
            t0 = time.perf_counter()
            causal_lm_loss(net, ids, labels, spec.cross_entropy)
            sync()
            fwd.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    heldout_loss_of(net, held, device, spec.cross_entropy)
    heldout_s = time.perf_counter() - t0
    net.train()
    split = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for step in range(steps + 1):
        marks = {}

        def clock(phase, marks=marks):
            sync()
            marks[phase] = time.perf_counter()

        start = time.perf_counter()
        idx = batch(step)
        ids, labels = train.ids[idx].to(device), train.labels[idx].to(device)
        clock("data")
        train_step(net, params, opt, sched, ids, labels, spec.cross_entropy, clock=clock,
                   offload=spec.offload_activations)
        if step:  # the first step is a warm-up (allocations, kernel choice)
            split["forward"].append(marks["forward"] - marks["data"])
            split["backward"].append(marks["backward"] - marks["forward"])
            split["optimizer"].append(marks["optimizer"] - marks["backward"])
            split["step"].append(marks["optimizer"] - start)
    med = {k: statistics.median(v) for k, v in split.items()}
    # The ceiling counts a step's own work (a forward and a backward of ~2 forwards); the held-out
    # passes the recipe runs every eval_every steps are forwards of other tokens, judged against the
    # forward by themselves (heldout_efficiency), and shown with the steps in train_tok_s_with_heldout.
    # (Inside the step they cost 0.8 forward a step in the default plan: 2,048 tokens / 5 steps / 512.)
    step_s = med["step"]
    heldout_per_step = heldout_s / spec.eval_every
    forward_tok_s = tokens / statistics.median(fwd)
    ceiling = forward_tok_s / (4 if ckpt else 3)
    out.write_text(json.dumps({
        "adapter": name, "train_quant": spec.train_quant, "checkpointing": ckpt,
        "tokens_per_step": tokens, "step_s": step_s, "train_tok_s": tokens / step_s,
        "forward_tok_s": forward_tok_s, "ceiling_tok_s": ceiling, "efficiency": tokens / step_s / ceiling,
        "forward_s": med["forward"], "backward_s": med["backward"], "optimizer_s": med["optimizer"],
        "rest_s": step_s - med["forward"] - med["backward"] - med["optimizer"],
        "heldout_s": heldout_s, "heldout_s_per_step": heldout_per_step,
        "heldout_efficiency": held.ids.numel() / heldout_s / forward_tok_s,
        "train_tok_s_with_heldout": tokens / (step_s + heldout_per_step),
        "steps": steps, "device": device, "allocator": allocator_description()}))


def write_training(frame: pd.DataFrame, out: Path, load: str = "") -> str:
    """The markdown table (returned, for bench.md) and training.csv."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "training.csv", frame.to_csv(index=False))
    lines = ["\n## Training efficiency\n",
             f"Ceiling: the no-grad forward's tokens/s at the training batch / 3 (/ 4 with gradient checkpointing); "
             f"target efficiency >= {EFFICIENCY_TARGET}. Step split at explicit boundaries, median of the timed "
             f"steps after one warm-up; rest = batch indexing and copies. The held-out passes (every eval_every "
             f"steps, no gradients) are forwards of other tokens: per step apart, with their own efficiency "
             f"against the same forward (target {EFFICIENCY_TARGET} too), and with the steps in the last tokens/s. "
             f"Allocator: {', '.join(sorted(set(frame.allocator))) if len(frame) else '-'} (where it says "
             f"relaxed: the training child's after its measured window, the speed most of `qeval run`'s steps run at)."
             + (f" Load average at the start: {load}." if load else "") + "\n",
             "| adapter | base | checkpointing | train tok/s | forward tok/s | ceiling | efficiency | forward s | "
             "backward s | optimizer s | rest s | held-out s/step | held-out efficiency | tok/s with held-out | target |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in frame.itertuples(index=False):
        lines.append(f"| {r.adapter} | {r.train_quant} | {'on' if r.checkpointing else 'off'} | {r.train_tok_s:.1f} | "
                     f"{r.forward_tok_s:.0f} | {r.ceiling_tok_s:.1f} | {r.efficiency:.2f} | {r.forward_s:.3f} | "
                     f"{r.backward_s:.3f} | {r.optimizer_s:.3f} | {r.rest_s:.3f} | {r.heldout_s_per_step:.3f} | "
                     f"{r.heldout_efficiency:.2f} | {r.train_tok_s_with_heldout:.1f} | "
                     f"{'met' if r.meets_target else 'MISSED'} |")
    return "\n".join(lines) + "\n"


def with_settings(adapters: dict, **changes) -> dict:
    """The adapters with some spec fields replaced (tests: a tiny recipe)."""
    return {k: dataclasses.replace(v, **changes) for k, v in adapters.items()}
