"""Training memory on CUDA: LoRA vs QLoRA (vs full) per phase, by part, against the analytic model.

Builds a Llama from a config on the spot (random weights: memory does not depend on them), with a
byte-level BPE tokenizer trained on the given JSONL text, trains each arm a few steps through
qeval.train.recipe.finetune (each in a fresh process: CUDA max allocated reset per phase), and prints
measured peak, its parts and the prediction of qeval.models.memory.estimate with the error.
`--cpu-dry-run` runs the same tiny on CPU to catch crashes before spending device time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(folder: Path, texts: list[str], hidden: int, inter: int, layers: int, vocab: int) -> Path:
    from gpu_check import build_llama  # scripts/ is on sys.path when a script runs

    return build_llama(folder, texts, hidden, inter, layers, vocab, heads=hidden // 64,
                       kv_heads=max(1, hidden // 256), max_positions=4096)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a JSONL file with text rows")
    ap.add_argument("--cpu-dry-run", action="store_true")
    args = ap.parse_args()
    from qeval.train.recipe import finetune
    from qeval.train.spec import AdapterSpec
    from qeval.models.load import resolve_model

    texts = [json.loads(x)["text"] for x in Path(args.data).read_text().splitlines() if x.strip()]
    dry = args.cpu_dry_run
    device = "cpu" if dry else "cuda"
    work = Path(tempfile.mkdtemp(prefix="qeval-memcheck-"))
    os.environ.setdefault("QEVAL_CACHE", str(work / "cache"))
    size = dict(hidden=64, inter=128, layers=2, vocab=512) if dry else dict(hidden=1024, inter=2816, layers=12, vocab=8000)
    model = resolve_model(str(build(work / "model", texts, **size)))
    seq, batch = (64, 2) if dry else (512, 8)
    rows = []
    for name, extra in (("lora", {}), ("qlora", {"train_quant": "bnb-nf4-dq"}), ("full", {"method": "full", "lr": 1e-5})):
        spec = AdapterSpec(train_data=args.data, steps=3, batch_size=batch, seq_len=seq, eval_every=3, **extra)
        art = finetune(model, spec, device)
        m = art.memory
        p = m.get("predicted", {})
        rows.append((name, m["load_peak"], m["train_peak"], m["weights"], m["adapter_optimizer"], m["gradients"],
                     m["activations"], p.get("total", float("nan")), m.get("prediction_error")))
    mib = lambda x: f"{x / 2**20:9.1f}"
    print(f"device {device}; model {size}; batch {batch} x seq_len {seq}; MiB")
    print(f"{'arm':6} {'load pk':>9} {'train pk':>9} {'weights':>9} {'adapt+opt':>9} {'grads':>9} {'activ':>9} {'predicted':>9} error")
    for r in rows:
        print(f"{r[0]:6} " + " ".join(mib(x) for x in r[1:8]) + f" {r[8]:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
