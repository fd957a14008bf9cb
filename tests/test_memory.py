"""Peak memory per phase, the analytic training-memory model, and `qeval plan-memory`."""
import json

import pytest
import torch

from qeval.memory import GIB, QUANT_BYTES, PhasePeaks, Shape, estimate, fits_table


def test_phase_peaks_see_a_phase_and_release_what_it_freed():
    phases = PhasePeaks("cpu", interval=0.005)
    size = 256 * 2**20
    with phases.phase("big"):
        x = torch.ones(size // 4)  # 256 MiB, touched
        x.add_(1)
        del x
    with phases.phase("after"):
        pass
    assert phases.peak["big"] - phases.start["big"] >= 0.9 * size
    # the freed tensor does not carry over into the next phase's baseline
    assert phases.start["after"] < phases.peak["big"] - 0.5 * size


def test_shape_counts_parameters_like_the_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = Shape.from_config(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_params(8) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_nf4_bytes_match_bitsandbytes(tiny_model_dir):
    from qeval.models import load_model, resolve_model
    from qeval.quant import FORMATS

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    fp = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("bnb-nf4"), "cpu").footprint
    shape = Shape.from_config(cfg)
    # plus a fixed 64 bytes per tensor (its 16-entry NF4 code table): 2% on this toy, nothing on a real model
    assert fp.quantized_weight_bytes + fp.quant_state_bytes == pytest.approx(
        shape.linear_params * QUANT_BYTES["bnb-nf4"] + 14 * 64, rel=0.001)


def _shipped(name):
    from pathlib import Path

    import qeval

    return Shape.from_config(json.loads((Path(qeval.__file__).parent / "data" / "configs" / f"{name}.json").read_text()))


def test_projection_agrees_with_published_figures():
    # torchtune Llama-3-8B single-device recipes: LoRA ~16.2 GiB, QLoRA ~7.4 GiB peak: LoRA does not fit
    # a 16 GiB card, QLoRA does
    fits = {r["method"]: r for r in fits_table(_shipped("llama-3-8b"), 16, batch=2, seq_len=512)}
    assert not fits["lora"]["fits"] and fits["qlora"]["fits"] and not fits["full"]["fits"]
    assert fits["lora"]["total_gib"] == pytest.approx(16.2, rel=0.15) and fits["qlora"]["total_gib"] == pytest.approx(7.4, rel=0.15)
    # QLoRA paper: a 65B model fine-tunes on one 48 GB GPU; a 70B's LoRA needs its 131 GiB of bf16 weights
    assert {r["method"]: r["fits"] for r in fits_table(_shipped("llama-65b"), 48, 1, 512)}["qlora"]
    seventy = {r["method"]: r["fits"] for r in fits_table(_shipped("llama-3-70b"), 80, 1, 2048)}
    assert seventy == {"lora": False, "qlora": True, "full": False}
    # the weights part is parameters x bytes: 8B bf16 = 16.06 GB
    e = estimate(_shipped("llama-3-8b"), "lora", 1, 1)
    assert e.weights == _shipped("llama-3-8b").params * 2 and e.weights / GIB == pytest.approx(14.96, abs=0.01)


def test_plan_memory_command(capsys, tmp_path):
    from qeval.cli import main

    assert main(["plan-memory", "--config", "llama-3-8b", "--gpu", "16"]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in ("lora", "qlora", "full")}
    assert lines["lora"].endswith("no") and lines["qlora"].endswith("yes")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["plan-memory", "--config", str(tmp_path), "--gpu", "16"]) == 2
    assert "vocab_size" in capsys.readouterr().err
