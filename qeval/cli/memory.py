"""`qeval plan-memory`: which of LoRA / QLoRA / full fine-tune fits a GPU, from a model's config.json."""
from __future__ import annotations

import json
from pathlib import Path

from qeval.cli.base import Command, QevalError, number, positive_int, register
from qeval.core import env


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in (env.PACKAGE_DATA / "configs").glob("*.json"))


def arguments(pm) -> None:
    pm.add_argument("--config", required=True,
                    help="a hub-style config.json (or its folder), or a shipped shape: " + ", ".join(shipped_configs()))
    pm.add_argument("--gpu", type=number(float, lambda x: x > 0, "a positive GPU size in GiB"), nargs="+",
                    default=[16.0, 24.0, 48.0, 80.0], help="GPU memory in GiB (default: 16 24 48 80)")
    pm.add_argument("--batch-size", type=positive_int, default=1)
    pm.add_argument("--seq-len", type=positive_int, default=2048)
    pm.add_argument("--r", type=positive_int, default=16, help="LoRA rank (all linear layers)")


def cmd_plan_memory(args) -> int:
    from qeval.train.estimate import Shape, fits_table

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


register(Command("plan-memory", "which of LoRA / QLoRA / full fine-tune fits a GPU, from a model's config.json",
                 cmd_plan_memory, arguments,
                 dict(description="Predict peak training memory (qeval.train.estimate: weights, adapter + AdamW, "
                                  "gradients, activations with gradient checkpointing, bf16 compute) for a model "
                                  "config and say what fits a GPU of --gpu GiB.")))
