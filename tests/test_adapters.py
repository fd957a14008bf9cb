"""One LoRA trainer: LoRA and QLoRA on the tiny model, reuse, merge paths, full fine-tune."""
import json

import pytest
import torch
from safetensors import safe_open

from qeval.adapters import AdapterSpec, attach, finetune, load_finetuned
from qeval.errors import QevalError
from qeval.models import load_model, resolve_model
from qeval.quant import FORMATS

TINY = dict(steps=4, batch_size=2, seq_len=64, eval_every=2, lr=1e-2)  # a large lr: visible change in 4 steps


@pytest.fixture
def resolved(tiny_model_dir):
    return resolve_model(str(tiny_model_dir))


@pytest.fixture
def ids(resolved):
    tok = load_model(resolved, FORMATS.get("none"), "cpu").tokenizer
    return tok("Firefighters battled the blaze near Sydney overnight.", return_tensors="pt").input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_trains_only_lora_tensors_and_saves_only_them(resolved):
    art = finetune(resolved, AdapterSpec(**TINY), "cpu")  # in its own process, as `qeval run` does
    assert not art.reused and art.path.is_dir()
    with safe_open(str(art.path / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)
    # all linear layers of the blocks: 2 layers x 7 projections x (A, B)
    assert len(names) == 2 * 7 * 2
    # r x (in + out) per projection; tiny model: hidden 64, kv width 32 (2 of 4 heads), mlp 128
    r, h, kv, mlp = 16, 64, 32, 128
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + mlp) + (mlp + h))
    assert art.trainable_params == 2 * per_layer
    assert len(art.losses) == 4 and [s for s, _ in art.heldout] == [0, 2, 4]
    assert art.peak_train_bytes > art.idle_bytes > 0 and art.s_per_step > 0 and art.tokens_per_s > 0
    assert art.adapter_bytes == (art.path / "adapter_model.safetensors").stat().st_size
    meta = json.loads((art.path / "qeval-artifact.json").read_text())
    assert meta["spec"]["train_quant"] == "none" and meta["key"] == art.key


def test_qlora_base_is_really_4bit_during_training(resolved, monkeypatch):
    import qeval.adapters as adapters

    seen = {}
    real = adapters._trainable

    def spy(model, spec):
        net = real(model, spec)
        census = {}
        for n, p in net.named_parameters():
            census.setdefault(f"{type(p).__name__}:{p.dtype}:{p.requires_grad}", []).append(n)
        seen.update(census)
        return net

    monkeypatch.setattr(adapters, "_trainable", spy)
    art = finetune(resolved, AdapterSpec(train_quant="bnb-nf4-dq", **TINY), "cpu", isolate=False)
    frozen_4bit = seen.get("Params4bit:torch.uint8:False", [])
    assert len(frozen_4bit) == 14  # every projection stays packed 4-bit and frozen
    trainable = [n for k, names in seen.items() if k.endswith(":True") for n in names]
    assert trainable and all("lora_" in n for n in trainable)
    # nothing non-LoRA was upcast or unfrozen: embeddings and norms stay frozen float32
    assert all("lora_" not in n for n in seen.get("Parameter:torch.float32:False", []))
    assert art.spec.train_quant == "bnb-nf4-dq"


def test_second_finetune_reuses_the_artifact(resolved, monkeypatch):
    spec = AdapterSpec(**TINY)
    first = finetune(resolved, spec, "cpu", isolate=False)
    import qeval.adapters as adapters

    monkeypatch.setattr(adapters, "load_model", lambda *a, **k: pytest.fail("retrained instead of reusing"))
    again = finetune(resolved, spec, "cpu")
    assert again.reused and again.key == first.key and again.losses == first.losses
    other = adapters.adapter_key(resolved, AdapterSpec(**{**TINY, "r": 8}), "cpu")
    assert other != first.key  # a different recipe is a different adapter


def test_merge_paths(resolved, ids):
    art = finetune(resolved, AdapterSpec(train_quant="bnb-nf4-dq", **TINY), "cpu", isolate=False)
    quantized = _logits(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu").model, ids)
    unmerged_lm = attach(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu"), art)
    unmerged = _logits(unmerged_lm.model, ids)
    assert (unmerged - quantized).abs().max() > 1e-4  # the adapter changes the model
    merged_lm = attach(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu"), art, merge="dequantized")
    merged = _logits(merged_lm.model, ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)  # exact up to float rounding
    assert merged_lm.fmt.name == "none" and merged_lm.footprint.quantized_params == 0
    assert not any("lora_" in n for n, _ in merged_lm.model.named_parameters())
    requant_lm = attach(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu"), art, merge="requantized")
    assert requant_lm.fmt.name == "bnb-nf4-dq"
    assert {type(p).__name__ for n, p in requant_lm.model.named_parameters() if "proj" in n} == {"Params4bit"}
    requant = _logits(requant_lm.model, ids)
    assert (requant - merged).abs().max() > 1e-4  # re-quantizing the merged weights is lossy


def test_full_finetune_reference_arm(resolved, ids):
    art = finetune(resolved, AdapterSpec(method="full", **{**TINY, "lr": 1e-3}), "cpu", isolate=False)
    assert art.trainable_params == art.total_params
    ft = load_finetuned(resolved, art, "none", "cpu")
    base = load_model(resolved, FORMATS.get("none"), "cpu")
    assert (_logits(ft.model, ids) - _logits(base.model, ids)).abs().max() > 1e-4
    assert ft.resolved.fingerprint == resolved.fingerprint  # results stay keyed to the base model


def test_impossible_combinations_are_one_line_errors():
    probs = AdapterSpec(method="full", train_quant="bnb-nf4").problems("adapters.x")
    assert len(probs) == 1 and "train_quant" in str(probs[0]) and "lora" in str(probs[0])
    probs = AdapterSpec(method="dora", train_quant="bnb-nf5", steps=0).problems("adapters.y")
    text = "\n".join(map(str, probs))
    assert "did you mean 'bnb-nf4'" in text and "'dora'" in text and "steps" in text
    assert all(isinstance(p, QevalError) for p in probs)
