"""Where a training forward's time goes, against the same network's no-grad forward.

    PYTHONPATH=. .venv/bin/python scripts/profile_train_forward.py [lora|qlora] [--plan plans/default.yaml]

Builds the plan's adapter as the recipe does (`qeval.train.recipe.trainable`, gradient checkpointing
off), takes two optimizer steps, then times `causal_lm_loss` on one training batch in the four
combinations of train / eval mode and grad / no-grad (median of 3), and prints torch.profiler's
top operators of one train-mode forward with gradients. Found with it (docs/performance.md): LoRA
dropout's Bernoulli masks, one per adapted layer, are ~27% of a QLoRA training forward on CPU.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from qeval.data.train_data import prepare
from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS
from qeval.run.plan import load_plan
from qeval.train.loss import causal_lm_loss
from qeval.train.recipe import optimizer, train_step, trainable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter", nargs="?", default="qlora")
    ap.add_argument("--plan", default="plans/default.yaml")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    spec = load_plan(Path(args.plan)).adapters[args.adapter]
    torch.manual_seed(spec.seed)
    base = load_model(resolve_model(args.model), FORMATS.get(spec.train_quant), "cpu")
    net = trainable(base.model, spec, False)
    params = [p for p in net.parameters() if p.requires_grad]
    train, _, _ = prepare(spec.train_data, base.tokenizer, spec.seq_len, spec.packing)
    opt, sched = optimizer(params, spec)
    ids, labels = train.ids[:spec.batch_size], train.labels[:spec.batch_size]
    for _ in range(2):  # states allocated, kernels chosen
        train_step(net, params, opt, sched, ids, labels, spec.cross_entropy)

    def forward_s(mode: str, grad: bool) -> float:
        net.train(mode == "train")
        with torch.set_grad_enabled(grad):
            t = time.perf_counter()
            causal_lm_loss(net, ids, labels, spec.cross_entropy)
            return time.perf_counter() - t

    for mode, grad in (("eval", False), ("train", False), ("eval", True), ("train", True)):
        print(f"{mode:5s} {'grad' if grad else 'no-grad':7s} {sorted(forward_s(mode, grad) for _ in range(3))[1]:.3f} s")
    net.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        causal_lm_loss(net, ids, labels, spec.cross_entropy)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
