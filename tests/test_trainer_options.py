"""The trainer's optimizer and activation-offloading options (issue 24, item 4): data in the adapter
spec, keyed only when set, refused on CPU where they need CUDA, and their memory against the
analytic model (qeval.train.estimate). The CUDA side runs in the prepared GPU check (`gpu` marker)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qeval.core.errors import QevalError
from qeval.models.load import resolve_model
from qeval.train.estimate import BNB_BLOCK, MIN_8BIT, MIN_PAGED, Options
from qeval.train.recipe import finetune
from qeval.train.spec import AdapterSpec, adapter_key

TINY = dict(steps=3, batch_size=2, seq_len=64, eval_every=3, lr=1e-2)


@pytest.fixture
def resolved(tiny_model_dir):
    return resolve_model(str(tiny_model_dir))


def test_default_options_leave_the_adapter_key_unchanged(resolved):
    spec = AdapterSpec(**TINY)
    assert "optimizer" not in spec.identity() and "offload_activations" not in spec.identity()
    keys = {adapter_key(resolved, dataclasses.replace(spec, **c), "cpu")
            for c in ({}, {"optimizer": "adamw8bit"}, {"offload_activations": True})}
    assert len(keys) == 3  # a set option is a different adapter; the default is the key of before


def test_bad_option_values_are_reported_together_with_a_suggestion():  # the CLI's side: test_bad_input
    errors = AdapterSpec(optimizer="adamw_8bit", offload_activations="yes").problems("adapters.a")
    text = "\n".join(str(e) for e in errors)
    assert "adapters.a.optimizer" in text and "adamw8bit" in text  # did you mean
    assert "adapters.a.offload_activations" in text


@pytest.mark.parametrize("change, field", [({"optimizer": "paged_adamw8bit"}, "optimizer"),
                                           ({"offload_activations": True}, "offload_activations")])
def test_cuda_only_options_are_refused_on_cpu_before_training(resolved, change, field):
    spec = AdapterSpec(**TINY, **change)
    assert spec.problems("a") == []
    assert [e.what for e in spec.device_problems("a", "cpu")] == [f"a.{field}"]
    assert spec.device_problems("a", "cuda") == []
    with pytest.raises(QevalError, match="CUDA device"):
        finetune(resolved, spec, "cpu", isolate=False)


def test_8bit_optimizer_states_are_what_the_model_counts(resolved):
    """AdamW8bit on CPU (bitsandbytes): the optimizer's measured state bytes against the model's
    rule, computed here independently per trainable tensor: two uint8 states + one fp32 absmax per
    256 for a tensor of 4,096 elements or more, two fp32 states below, and two shared 256-value maps (r 64 on the tiny model puts
    q/o/gate/up's A or B at or above the threshold and k/v's B below it). The 8-bit adapter trains."""
    spec = AdapterSpec(**TINY, r=64, alpha=64, optimizer="adamw8bit")
    art = finetune(resolved, spec, "cpu", isolate=False)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    net = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolved.path), str(art.path))
    sizes = [p.numel() for n, p in net.named_parameters() if "lora_" in n]
    assert any(n < MIN_8BIT for n in sizes) and any(n >= MIN_8BIT for n in sizes)
    expected = (sum(2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) if n >= MIN_8BIT else 2 * 4 * n for n in sizes)
                + 2 * 256 * 4)  # the two fp32 quantization maps (256 values each), shared by every 8-bit tensor
    measured = art.memory["adapter_optimizer"] - 4 * sum(sizes)  # minus the fp32 LoRA weights themselves
    assert measured == expected
    assert Options(optimizer="adamw8bit").states(sizes, 4) == (expected, 0)
    assert art.memory["options"].endswith("optimizer adamw8bit") and art.memory["paged"] == 0
    assert all(math.isfinite(x[1]) for x in art.heldout) and art.heldout[-1][1] < art.heldout[0][1]


def test_paged_states_are_only_the_large_tensors():
    """bitsandbytes pages a state only for tensors of MIN_PAGED elements or more: LoRA's small A/B
    matrices stay in device memory even with a paged optimizer."""
    o = Options(optimizer="paged_adamw")
    assert o.states([MIN_PAGED - 1], 2) == (8 * (MIN_PAGED - 1), 0)
    assert o.states([MIN_PAGED], 2) == (0, 8 * MIN_PAGED)
    assert Options().states([10, MIN_PAGED], 2) == (4 * (10 + MIN_PAGED), 0)  # torch AdamW: 2 states of bf16


@pytest.mark.gpu
def test_offloading_keeps_the_gradients_and_lowers_the_peak(tiny_model_dir):
    """On CUDA: one LoRA step with and without activation offloading gives the same gradients, bit
    for bit (the saved tensors travel to pinned host memory and back unchanged), and a lower peak
    of allocated memory when the kept activations dominate."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from qeval.models.load import load_model
    from qeval.quant.formats import FORMATS
    from qeval.train.loss import causal_lm_loss
    from qeval.train.recipe import trainable

    spec = AdapterSpec(**TINY)
    ids = torch.randint(3, 500, (8, 512), device="cuda")
    out = {}
    for offload in (False, True):
        torch.manual_seed(0)
        net = trainable(load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("none"), "cuda").model, spec, False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        keep = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else torch.enable_grad()
        with keep:
            loss = causal_lm_loss(net, ids, ids.clone(), "full")
        loss.backward()
        torch.cuda.synchronize()
        out[offload] = (torch.cuda.max_memory_allocated() - base,
                        [p.grad.clone() for p in net.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(out[False][1], out[True][1]))
    assert out[True][0] < out[False][0]
