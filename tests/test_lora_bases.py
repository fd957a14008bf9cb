"""QLoRA-style adapters on non-bitsandbytes bases (torchao int8, quanto int4): they train (gradients
reach the LoRA weights, the held-out loss falls), evaluate, and merge both ways; the merged float
model equals an independent merge W_deq + B @ A * alpha / r."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qeval.quant import formats as quant
from qeval.train.merge import attach
from qeval.train.recipe import finetune
from qeval.train.spec import AdapterSpec, adapter_key
from qeval.models.load import load_model
from qeval.quant.formats import FORMATS

pytest.importorskip("torchao")

TINY = dict(steps=4, batch_size=2, seq_len=32, eval_every=2, lr=1e-2, warmup_steps=1)
BASE = "torchao:int8-wo"


@pytest.fixture(scope="module")
def ids(resolved):
    tok = load_model(resolved, FORMATS.get("none"), "cpu").tokenizer
    return tok(["The fires forced residents from their homes near Sydney."], return_tensors="pt").input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def artifact(resolved):
    return finetune(resolved, AdapterSpec(train_quant=BASE, **TINY), "cpu", isolate=False)


def _independent_merge(resolved, art) -> torch.nn.Module:
    """The float model whose quantized linears hold dequant(W) + B @ A * alpha / r, built by hand."""
    base = load_model(resolved, FORMATS.get(BASE), "cpu").model
    flat = load_model(resolved, FORMATS.get("none"), "cpu").model
    lora = load_file(str(art.path / "adapter_model.safetensors"))
    scale = art.spec.alpha / art.spec.r
    merged = 0
    qmods = dict(base.named_modules())
    with torch.no_grad():
        for name, mod in flat.named_modules():
            a = lora.get(f"base_model.model.{name}.lora_A.weight")
            if a is None:
                continue
            b = lora[f"base_model.model.{name}.lora_B.weight"]
            mod.weight.copy_(qmods[name].weight.dequantize().float() + b.float() @ a.float() * scale)
            merged += 1
    assert merged == 14  # 7 linears per block x 2 blocks
    return flat


def test_lora_trains_on_torchao_int4_too(resolved):
    """The simulated int4 (one code per int8 byte) trains as well: the registry says so because it does."""
    assert FORMATS.get("torchao:int4-wo").lora_trainable
    art = finetune(resolved, AdapterSpec(train_quant="torchao:int4-wo", **TINY), "cpu", isolate=False)
    lora = load_file(str(art.path / "adapter_model.safetensors"))
    assert all(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    assert art.heldout[-1][1] < art.heldout[0][1]


def test_a_base_without_lora_support_is_one_exit_2_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A backend format that declares no LoRA training (none of the shipped ones today: a GPTQ kernel
    without backward would be one) is refused for train_quant and for an adapter arm's quant."""
    import dataclasses

    from qeval.cli import main

    name = "torchao:int2-wo:g32"
    monkeypatch.setitem(FORMATS._parsed, name, dataclasses.replace(FORMATS.get(name), lora_trainable=False))
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"models: [{tiny_model_dir}]\nformats: [none]\nadapters: {{a: {{train_quant: '{name}'}}}}\n"
                    "arms: [{name: x, quant: none, adapter: a}]\n")
    store = tmp_path / "store.sqlite"
    assert main(["run", "--plan", str(plan), "--store", str(store)]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("qeval: error: adapters.a.train_quant"), lines
    assert name in lines[0] and "LoRA" in lines[0] and "torchao:int8-wo" in lines[0]
    assert not store.exists()


def test_lora_trains_on_a_torchao_int8_base(artifact):
    lora = load_file(str(artifact.path / "adapter_model.safetensors"))
    bs = [v for k, v in lora.items() if "lora_B" in k]
    assert bs and all(b.abs().max() > 0 for b in bs)  # B starts at zero: gradients reached every adapter
    assert set(k.split(".")[-2] for k in lora) == {"lora_A", "lora_B"}  # only LoRA tensors saved
    (_, first), (_, last) = artifact.heldout[0], artifact.heldout[-1]
    assert last < first  # the held-out loss fell
    assert artifact.spec.train_quant == BASE


def test_merges_on_a_torchao_base_equal_an_independent_merge(resolved, artifact, ids):
    quantized = _logits(load_model(resolved, FORMATS.get(BASE), "cpu").model, ids)
    unmerged = _logits(attach(load_model(resolved, FORMATS.get(BASE), "cpu"), artifact).model, ids)
    assert (unmerged - quantized).abs().max() > 1e-4  # the adapter changes the model

    merged_lm = attach(load_model(resolved, FORMATS.get(BASE), "cpu"), artifact, merge="dequantized")
    assert merged_lm.fmt.name == "none" and merged_lm.footprint.quantized_params == 0
    assert not any("lora_" in n for n, _ in merged_lm.model.named_parameters())
    merged = _logits(merged_lm.model, ids)
    independent = _independent_merge(resolved, artifact)
    torch.testing.assert_close(merged, _logits(independent, ids), rtol=1e-5, atol=1e-5)
    # int8 weight-only computes x @ dequant(W): merging into the dequantized base keeps the numbers
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)

    requant_lm = attach(load_model(resolved, FORMATS.get(BASE), "cpu"), artifact, merge="requantized")
    assert requant_lm.fmt.name == BASE
    kinds = {type(p).__name__ for n, p in requant_lm.model.named_parameters() if "proj" in n}
    assert kinds == {"Int8Tensor"}, kinds
    # the same backend re-quantizes the same merged weights: equal to quantizing the independent merge
    FORMATS.get(BASE).after_load(independent, "cpu", torch.float32)
    torch.testing.assert_close(_logits(requant_lm.model, ids), _logits(independent, ids), rtol=1e-5, atol=1e-5)


def test_the_adapter_key_holds_the_base_format_spec(resolved, monkeypatch):
    spec = AdapterSpec(train_quant=BASE, **TINY)
    nf4 = AdapterSpec(train_quant="bnb-nf4", **TINY)
    before, before_nf4 = adapter_key(resolved, spec, "cpu"), adapter_key(resolved, nf4, "cpu")
    real = quant._version
    monkeypatch.setattr(quant, "_version", lambda dist: "9.9" if dist == "torchao" else real(dist))
    assert adapter_key(resolved, spec, "cpu") != before  # another torchao computes another base
    assert adapter_key(resolved, nf4, "cpu") == before_nf4  # bitsandbytes presets: keys unchanged


def test_quanto_int4_base_runs_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    """Train on quanto int4, evaluate unmerged, merged into float and re-quantized, through run_plan."""
    pytest.importorskip("optimum.quanto")
    from qeval.run import jobs
    from qeval.stats.compare import adapter_frames
    from qeval.run.driver import run_plan
    from qeval.run.plan import plan_from
    from qeval.store.store import Store

    real = finetune
    monkeypatch.setattr(jobs, "finetune", lambda *a, **k: real(*a, **{**k, "isolate": False}))
    (tmp_path / "s.yaml").write_text("name: s\ntasks:\n  - {task: qeval_lee_ppl, limit: 2}\n")
    q = "quanto:int4:g32"
    plan = plan_from(dict(models=(str(tiny_model_dir),), suite=str(tmp_path / "s.yaml"), device="cpu", formats=("none", q),
                          adapters={"ql": {**TINY, "train_quant": q, "domain_tasks": ["qeval_lee_ppl"]}},
                          arms=({"name": "ql", "quant": q, "adapter": "ql"},
                                {"name": "ql-float", "quant": q, "adapter": "ql", "merge": "dequantized"},
                                {"name": "ql-requant", "quant": q, "adapter": "ql", "merge": "requantized"})))
    summary = run_plan(plan, tmp_path / "store.sqlite", progress=lambda s: None)
    assert not summary.failed and len(summary.trained) == 1 and len(summary.computed) == 5
    with Store(tmp_path / "store.sqlite") as s:
        records = list(s.records())
    ppl = {r.variant.arm: r.metrics["word_perplexity"].value for r in records}
    assert ppl["ql"] != ppl[q]  # the adapter moved the numbers
    assert ppl["ql-float"] == pytest.approx(ppl["ql"], rel=1e-4)  # dequantize + merge keeps them
    merges = adapter_frames(records)["merge"].set_index("arm")
    assert merges.loc["ql-requant", "merged_bytes"] < merges.loc["ql-float", "merged_bytes"]  # int4 again


def test_shipped_qlora_bases_plan_is_valid():
    from pathlib import Path

    from qeval.run.runner import load_plan, validate

    rp = validate(load_plan(Path(__file__).parents[1] / "plans" / "qlora-bases.yaml"))
    bases = {s.train_quant for s in rp.adapters.values()}
    assert bases == {"none", "bnb-nf4-dq", "quanto:int4", "torchao:int4-wo", "gguf:q4_0"}
    assert len({(s.lr, s.steps, s.batch_size, s.seq_len, s.r, s.train_data) for s in rp.adapters.values()}) == 1
    assert sum(a.merge == "requantized" for a in rp.arms) == 4
