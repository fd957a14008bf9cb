"""`qeval plan-memory`: which of LoRA / QLoRA / full fine-tune fits a GPU, from a model's config.json,
under the memory choices of a named trainer (qeval's own, torchtune's) or options given one by one."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qeval.cli.base import Command, QevalError, number, positive_int, register
from qeval.core import env

TRAINER_NAMES = ("qeval", "torchtune")  # qeval.train.estimate.TRAINERS (not imported here: --help stays light)


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in (env.PACKAGE_DATA / "configs").glob("*.json"))


def arguments(pm) -> None:
    pm.add_argument("--config", required=True,
                    help="a hub-style config.json (or its folder), or a shipped shape: " + ", ".join(shipped_configs()))
    pm.add_argument("--gpu", type=number(float, lambda x: x > 0, "a positive GPU size in GiB"), nargs="+",
                    default=[16.0, 24.0, 48.0, 80.0], help="GPU memory in GiB (default: 16 24 48 80)")
    pm.add_argument("--batch-size", type=positive_int, default=1)
    pm.add_argument("--seq-len", type=positive_int, default=2048,
                    help="tokens per sequence: every sequence's with --packed, else the longest one's")
    pm.add_argument("--r", type=positive_int, default=None, help="LoRA rank (default: the trainer's, qeval 16, torchtune 8)")
    pm.add_argument("--trainer", choices=TRAINER_NAMES, default="qeval",
                    help="whose memory choices to assume (default qeval: its own trainer's); the options below override it")
    pm.add_argument("--checkpointing", choices=("layer", "none"), help="activation checkpointing per layer, or none")
    pm.add_argument("--cross-entropy", metavar="full|chunked:N|fused:N",
                    help="the loss over the logits: the model's own (full), chunked (torchtune's CEWithChunkedOutputLoss) "
                         "or fused with the LM head per chunk")
    pm.add_argument("--offload", action=argparse_bool(), help="activation offloading to host memory (CUDA)")
    pm.add_argument("--optimizer", choices=("adamw", "adamw8bit", "paged_adamw", "paged_adamw8bit"))
    pm.add_argument("--lora-targets", metavar="all-linear|q,k,v,o,gate,up,down", help="the linear layers LoRA adapts")
    pm.add_argument("--packed", action=argparse_bool(), default=True,
                    help="sequences packed to --seq-len (default): every step holds batch x seq-len tokens")


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


def _options(args) -> dict:
    from qeval.train.estimate import TRAINERS

    override = {k: v for k, v in (("checkpointing", args.checkpointing), ("cross_entropy", args.cross_entropy),
                                  ("offload", args.offload), ("optimizer", args.optimizer)) if v is not None}
    if args.lora_targets:
        t = args.lora_targets.strip()
        override["lora_targets"] = t if t == "all-linear" else tuple(x.strip().removesuffix("_proj") for x in t.split(","))
    out = {m: dataclasses.replace(o, **override) for m, o in TRAINERS[args.trainer].items()}
    problems = sorted({p for o in out.values() for p in o.problems()})
    if problems:
        raise QevalError("plan-memory options", "; ".join(problems), "valid options", "see `qeval plan-memory --help`")
    return out


def cmd_plan_memory(args) -> int:
    from qeval.train.estimate import TRAINER_RANK, Shape, fits_table

    path = Path(args.config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() and args.config in shipped_configs():
        path = env.PACKAGE_DATA / "configs" / f"{args.config}.json"
    if not path.is_file():
        from qeval.core.errors import unknown_name

        raise unknown_name("--config", args.config, shipped_configs(), "or the path of a config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise QevalError("--config", str(path), f"a JSON config ({e})", "pass a model's config.json") from None
    shape = Shape.from_config(cfg)
    options = _options(args)
    r = args.r or TRAINER_RANK[args.trainer]
    print(f"{args.config}: {shape.params / 1e9:.2f} B parameters ({shape.layers} layers, hidden {shape.hidden}, "
          f"vocab {shape.vocab:,}); batch {args.batch_size} x seq_len {args.seq_len} "
          f"({'packed: every step that many tokens' if args.packed else 'unpacked: seq_len is the longest sequence'}), "
          f"bf16 compute, LoRA r={r}; QLoRA on NF4 + double quant")
    print(f"trainer {args.trainer}:")
    for method, o in options.items():
        print(f"  {method:6} {o.describe(method)}")
    print("allocator = the peak torch.cuda.max_memory_allocated counts (what torchtune logs); total adds 0.5 GiB "
          "of CUDA context; paged = optimizer states in CUDA unified memory, outside the allocator, evicted under pressure")
    for gpu in args.gpu:
        rows = fits_table(shape, gpu, args.batch_size, args.seq_len, r, options)
        print(f"\nGPU {gpu:g} GiB:")
        print(f"{'method':8} {'weights':>9} {'adapter+opt':>12} {'grads':>8} {'activations':>12} {'paged':>7} "
              f"{'allocator':>10} {'total GiB':>10}  fits")
        for x in rows:
            print(f"{x['method']:8} {x['weights_gib']:9.2f} {x['adapter_optimizer_gib']:12.2f} {x['gradients_gib']:8.2f} "
                  f"{x['activations_gib']:12.2f} {x['paged_gib']:7.2f} {x['allocator_gib']:10.2f} "
                  f"{x['total_gib']:10.2f}  {'yes' if x['fits'] else 'no'}")
    return 0


register(Command("plan-memory", "which of LoRA / QLoRA / full fine-tune fits a GPU, from a model's config.json",
                 cmd_plan_memory, arguments,
                 dict(description="Predict peak training memory (qeval.train.estimate: weights, adapter + optimizer, "
                                  "gradients, activations, bf16 compute) for a model config under a trainer's memory "
                                  "choices (--trainer qeval|torchtune, or --checkpointing, --cross-entropy, --offload, "
                                  "--optimizer, --lora-targets) and say what fits a GPU of --gpu GiB.")))
