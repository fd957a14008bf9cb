"""Measured vs predicted training memory per trainer option, through qeval's own trainer: the tables
"Each option checked against a measured run" in docs/adapters-and-memory.md (CPU: each training in
its own process, float32, RSS; CUDA: in this process, bf16, max allocated reset per phase).

Builds each model from a config (random weights: memory does not depend on them) with the tokenizer
of a local model folder (`--tokenizer`; the vocabulary is the config's, the tokenizer only has to
encode the training text), trains LoRA r 16 on all linear layers (or the whole model) for 2 steps
of BATCH x SEQ tokens with one held-out row, and prints one JSON line per (shape, option): measured
and predicted activations and peak (MiB) and the prediction error. Shapes: "wide-vocab" (vocab
16,384, hidden 64, 2 layers: the logits dominate), "deep" (vocab 2,048, hidden 256, 8 layers: the
blocks dominate) and "gemma3-270m" (Gemma-3-270M's shape: vocab 262,144, hidden 640, 18 layers; the
real model's weights are not needed for memory). An option is `+`-joined tokens: a cross-entropy
(full, chunked:N, fused:N), a checkpointing (layer, the default, or none), `offload`, an optimizer
(adamw8bit, paged_adamw, ...), `full-ft` (a full fine-tune instead of LoRA); e.g. full, chunked:8,
full+none, none+offload, full-ft+paged_adamw8bit.

    PYTHONPATH=$PWD .venv/bin/python scripts/measure_train_memory.py --tokenizer TINY_MODEL_DIR \
        --shapes wide-vocab --options full,chunked:8,fused:8
    PYTHONPATH=$PWD .venv/bin/python scripts/measure_train_memory.py --tokenizer TINY_MODEL_DIR \
        --shapes deep --options full,full+none
    # on a GPU (scripts/gpu_check.py runs this): Gemma-3-270M's shape, torchtune's batch 2 x 2,048
    python scripts/measure_train_memory.py --tokenizer DIR --device cuda --shapes gemma3-270m \
        --batch 2 --seq 2048 --options full,chunked:8,fused:8,none,none+offload,adamw8bit,full-ft,full-ft+paged_adamw8bit
"""
from __future__ import annotations

import argparse
import gc
import json
import re
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
    # google/gemma-3-270m's config.json (text part); Gemma3ForCausalLM
    "gemma3-270m": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                        tie_word_embeddings=True),
    "gemma3-tiny": dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,  # dry runs
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64,
                        tie_word_embeddings=True),
}


def build(folder: Path, shape: str, tokenizer: str) -> Path:
    """A randomly initialised model of `shape` with `tokenizer`'s files."""
    import torch
    from transformers import (AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                              LlamaForCausalLM)

    if not folder.exists():
        torch.manual_seed(0)
        if shape.startswith("gemma3"):
            Gemma3ForCausalLM(Gemma3TextConfig(max_position_embeddings=4096, **SHAPES[shape])).to(
                torch.bfloat16).save_pretrained(folder)
        else:
            LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])).save_pretrained(folder)
        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    return folder


def spec_of(option: str, data: Path, batch: int, seq: int):
    """The AdapterSpec of one option string (module docstring)."""
    from qeval.train.estimate import OPTIMIZERS
    from qeval.train.spec import AdapterSpec

    kw = dict(steps=2, batch_size=batch, seq_len=seq, eval_every=2, train_data=str(data))
    for tok in re.split(r"[+/]", option):
        if tok in ("layer", "none"):
            kw["gradient_checkpointing"] = tok == "layer"
        elif tok == "offload":
            kw["offload_activations"] = True
        elif tok in OPTIMIZERS:
            kw["optimizer"] = tok
        elif tok == "full-ft":
            kw.update(method="full", lr=1e-5)
        else:
            kw["cross_entropy"] = tok
    return AdapterSpec(**kw)


def measure(folder: Path, options: list[str], device: str, data: Path, batch: int, seq: int, shape: str = ""):
    """One row (a dict) per option, printed as a JSON line as it is measured."""
    import torch

    from qeval.models.load import resolve_model
    from qeval.train.recipe import finetune

    rows = []
    for opt in options:
        spec = spec_of(opt, data, batch, seq)
        t = time.time()
        # CPU: a child per training (RSS never shrinks back); CUDA: max allocated is reset per phase
        m = finetune(resolve_model(str(folder)), spec, device, isolate=device == "cpu").memory
        p = m["predicted"]
        row = {"shape": shape or folder.name, "opt": opt, "options": m.get("options"), "s": round(time.time() - t, 1),
               "tokens": batch * seq, "act_meas_MiB": round(m["activations"] / 2**20, 1),
               "act_pred_MiB": round(p["activations"] / 2**20, 1),
               "opt_meas_MiB": round(m["adapter_optimizer"] / 2**20, 1),
               "opt_pred_MiB": round(p["adapter_optimizer"] / 2**20, 1),
               "paged_meas_MiB": round(m.get("paged", 0) / 2**20, 1), "paged_pred_MiB": round(p.get("paged", 0) / 2**20, 1),
               "peak_MiB": round(m["train_peak"] / 2**20, 1), "pred_MiB": round(p["total"] / 2**20, 1),
               "err": round(m["prediction_error"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if device.startswith("cuda"):
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def training_rows(n_train: int = 40, tokenizer: str = "", seq: int = 0) -> Path:
    """n_train training rows of the suite's training text and held-out rows after them, as a JSONL
    file: one row, or with `tokenizer` and `seq` as many as make one full held-out block (one
    held-out sequence: the training step's peak stays the one measured, not a wide held-out pass)."""
    from qeval.data.suite_data import suite_data_dir

    rows = (suite_data_dir() / "train_text.jsonl").read_text().splitlines()
    held = rows[n_train:n_train + 1]
    if tokenizer and seq:
        from transformers import AutoTokenizer

        tok, held, n = AutoTokenizer.from_pretrained(tokenizer), [], 0
        for r in rows[n_train:]:
            if n >= seq:
                break
            held.append(r)
            n += len(tok(json.loads(r)["text"], add_special_tokens=False).input_ids) + 1  # + the eos packing adds
    data = Path(tempfile.mkdtemp(prefix="qeval-trainmem-data-")) / "data.jsonl"
    data.write_text("\n".join([r[:-1] + ', "split": "train"}' for r in rows[:n_train]]
                              + [r[:-1] + ', "split": "heldout"}' for r in held]) + "\n")
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a local model folder whose tokenizer encodes the text")
    ap.add_argument("--shapes", default="wide-vocab,deep", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--options", default="full,chunked:8,fused:8,full+none", help="comma-separated (module docstring)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=40, help="training rows (enough tokens for 2 steps)")
    ap.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="qeval-trainmem-"))
    root.mkdir(parents=True, exist_ok=True)
    data = training_rows(args.rows, args.tokenizer, args.seq)
    for shape in args.shapes.split(","):
        measure(build(root / shape, shape, args.tokenizer), args.options.split(","), args.device, data,
                args.batch, args.seq, shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
