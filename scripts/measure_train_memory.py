"""Measured vs predicted training activations per trainer option, through qeval's own trainer (each
training in its own process, CPU, float32): the table "Each option checked against a measured run"
in docs/adapters-and-memory.md.

Builds each model from a config (random weights: memory does not depend on them) with the tokenizer
of a local model folder (`--tokenizer`; the vocabulary is the config's, the tokenizer only has to
encode the training text), trains LoRA r 16 on all linear layers for 2 steps of 4 x 256 tokens with
one held-out row, and prints one JSON line per (shape, option): measured and predicted activations
and peak (MiB) and the prediction error. Shapes: "wide-vocab" (vocab 16,384, hidden 64, 2 layers:
the logits dominate) and "deep" (vocab 2,048, hidden 256, 8 layers: the blocks dominate). An option
is CROSS_ENTROPY[/CHECKPOINTING], e.g. full, chunked:8, fused:8, full/none.

    PYTHONPATH=$PWD .venv/bin/python scripts/measure_train_memory.py --tokenizer TINY_MODEL_DIR \
        --shapes wide-vocab --options full,chunked:8,fused:8
    PYTHONPATH=$PWD .venv/bin/python scripts/measure_train_memory.py --tokenizer TINY_MODEL_DIR \
        --shapes deep --options full,full/none
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "wide-vocab": dict(vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
    "deep": dict(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a local model folder whose tokenizer encodes the text")
    ap.add_argument("--shapes", default="wide-vocab,deep", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--options", default="full,chunked:8,fused:8,full/none",
                    help="comma-separated CROSS_ENTROPY[/CHECKPOINTING] (checkpointing: layer (default) or none)")
    ap.add_argument("--work", default=None, help="folder for the models and data (default: a temporary one)")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qeval.data.suite_data import suite_data_dir
    from qeval.models.load import resolve_model
    from qeval.train.recipe import finetune
    from qeval.train.spec import AdapterSpec

    root = Path(args.work or tempfile.mkdtemp(prefix="qeval-trainmem-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = (suite_data_dir() / "train_text.jsonl").read_text().splitlines()
    data = root / "data.jsonl"  # 40 training rows, one held-out row
    data.write_text("\n".join([r[:-1] + ', "split": "train"}' for r in rows[:40]]
                              + [r[:-1] + ', "split": "heldout"}' for r in rows[40:41]]) + "\n")
    for shape in args.shapes.split(","):
        folder = root / shape
        if not folder.exists():
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, **SHAPES[shape])).save_pretrained(folder)
            AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(folder)
        for opt in args.options.split(","):
            ce, _, ck = opt.partition("/")
            spec = AdapterSpec(steps=2, batch_size=4, seq_len=256, eval_every=2, train_data=str(data),
                               cross_entropy=ce, gradient_checkpointing=(ck != "none"))
            t = time.time()
            m = finetune(resolve_model(str(folder)), spec, "cpu").memory
            p = m["predicted"]
            print(json.dumps({"shape": shape, "opt": opt, "options": m.get("options"), "s": round(time.time() - t, 1),
                              "act_meas_MiB": round(m["activations"] / 2**20, 1),
                              "act_pred_MiB": round(p["activations"] / 2**20, 1),
                              "peak_MiB": round(m["train_peak"] / 2**20, 1), "pred_MiB": round(p["total"] / 2**20, 1),
                              "err": round(m["prediction_error"], 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
