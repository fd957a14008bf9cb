"""Head-only scoring (qeval.lm.QevalLM) against lm-eval's stock HFLM: per-request log-likelihoods
within float tolerance, accuracy and generations identical, for every task type qeval ships;
on the float model, a bitsandbytes model and a PEFT-wrapped one."""
import numpy as np
import pytest

from qeval.evaluate import _quiet_lm_eval, _task_manager
from qeval.models import load_model, resolve_model
from qeval.quant import FORMATS

TASKS = {"qeval_analogy": (8, 0), "qeval_similarity": (8, 0), "qeval_lee_ppl": (3, 0), "qeval_capitals": (4, 3)}


def _run(lm, task):
    from lm_eval import simple_evaluate

    limit, shots = TASKS[task]
    return simple_evaluate(model=lm, tasks=[task], task_manager=_task_manager(False), limit=limit,
                           num_fewshot=shots, log_samples=True, bootstrap_iters=0, random_seed=0,
                           numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def _resps(res, task):
    return [[r[0] if isinstance(r, (list, tuple)) else r for r in s["resps"]] for s in res["samples"][task]]


def _compare(model, tok, batch_size, tasks=TASKS):
    from lm_eval.models.huggingface import HFLM

    from qeval.lm import QevalLM

    _quiet_lm_eval()
    for task in tasks:
        stock = _run(HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu"), task)
        ours = _run(QevalLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu"), task)
        a, b = _resps(stock, task), _resps(ours, task)
        assert len(a) == len(b) > 0
        for ra, rb in zip(a, b):
            for x, y in zip(ra, rb):
                if isinstance(x, (list, tuple)):  # (loglikelihood, is_greedy)
                    assert y[0] == pytest.approx(x[0], rel=1e-5, abs=1e-4) and y[1] == x[1]
                elif isinstance(x, float):  # rolling loglikelihood
                    assert y == pytest.approx(x, rel=1e-5)
                else:  # generated text
                    assert x == y
        for key, value in stock["results"][task].items():
            if key.startswith(("acc", "exact_match")):
                assert ours["results"][task][key] == value, (task, key)
            elif isinstance(value, float) and "perplexity" in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("fmt,tasks", [("none", list(TASKS)), ("bnb-nf4", ["qeval_analogy", "qeval_lee_ppl"])])
def test_head_only_equals_stock_hflm(tiny_model_dir, fmt, tasks):
    lm = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get(fmt), "cpu")
    _compare(lm.model, lm.tokenizer, 4, tasks)


def test_head_only_through_peft_and_softcap(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    lm = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("none"), "cpu")
    peft = get_peft_model(lm.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    _compare(peft, lm.tokenizer, 4, ["qeval_analogy"])
    # a soft-capped head (Gemma 2 style) is applied on the positions read, as in the model's forward
    from qeval.lm import head_logits, split_model

    body, head, softcap = split_model(peft)
    assert softcap is None and head is lm.model.lm_head
    h = np.random.default_rng(0).standard_normal((3, 64)).astype("float32")
    import torch

    capped = head_logits(head, torch.tensor(h), 2.0)
    assert float(capped.abs().max()) <= 2.0


def test_tokenization_is_reused_across_loads(tiny_model_dir):
    from qeval import lm as qlm

    r = resolve_model(str(tiny_model_dir))
    a, b = (load_model(r, FORMATS.get(f), "cpu") for f in ("none", "bnb-nf4"))
    la = qlm.QevalLM(pretrained=a.model, tokenizer=a.tokenizer, batch_size=1, device="cpu")
    lb = qlm.QevalLM(pretrained=b.model, tokenizer=b.tokenizer, batch_size=1, device="cpu")
    assert la._tok_fp == lb._tok_fp  # two loads of one tokenizer: one fingerprint
    text = "Athens is to Greece as Baghdad is to Iraq"
    before = len(qlm._TOKENS)
    assert la.tok_encode(text) == a.tokenizer.encode(text)
    assert len(qlm._TOKENS) == before + 1
    assert lb.tok_encode(text) == la.tok_encode(text) and len(qlm._TOKENS) == before + 1


@pytest.mark.slow
def test_head_only_equals_stock_hflm_on_the_embedded_model():
    lm = load_model(resolve_model("smollm2-135m"), FORMATS.get("none"), "cpu")
    _compare(lm.model, lm.tokenizer, 8, {"qeval_analogy": (32, 0), "qeval_lee_ppl": (4, 0), "qeval_capitals": (8, 3)})


def test_divergence_through_batched_forwards(peaked_dir):
    """Divergence rides on QevalLM's batched forwards: the baseline against itself is exactly 0 at
    batch 4 as at batch 1, and a variant's KL at batch 4 equals its KL at batch 1 (float tolerance)."""
    import dataclasses

    from qeval.evaluate import EvalSpec, evaluate
    from qeval.suites import TaskSpec

    r = resolve_model(str(peaked_dir))
    base, var = load_model(r, FORMATS.get("none"), "cpu"), load_model(r, FORMATS.get("bnb-nf4"), "cpu")
    kl = {}
    for bs in (1, 4):
        task = TaskSpec("qeval_lee_ppl", limit=4, batch_size=bs, divergence=True)
        ref = evaluate(base, task, EvalSpec(bootstrap_iters=10), "reference").reference
        assert ref is not None and len(ref.hidden) == 4
        again = evaluate(base, task, EvalSpec(bootstrap_iters=10), ref).divergence
        assert again.kl_max == 0.0 and again.top1_agree == 1.0
        kl[bs] = evaluate(var, dataclasses.replace(task), EvalSpec(bootstrap_iters=10), ref).divergence
    assert kl[4].tokens == kl[1].tokens and kl[1].kl_mean > 1e-4
    assert kl[4].kl_mean == pytest.approx(kl[1].kl_mean, rel=1e-3)


@pytest.fixture(scope="module")
def peaked_dir(tmp_path_factory):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("peaked-lm"), init_range=0.5)


def test_batch_size_auto_is_a_valid_choice_and_divergence_may_batch():
    from qeval.suites import TaskSpec

    assert TaskSpec("qeval_analogy", batch_size="auto").problems("t") == []
    assert TaskSpec("qeval_lee_ppl", batch_size=4, divergence=True).problems("t") == []
    assert [e.what for e in TaskSpec("qeval_analogy", batch_size="big").problems("t")] == ["t.batch_size"]
    assert len(TaskSpec("qeval_analogy", batch_size=0).problems("t")) == 1
