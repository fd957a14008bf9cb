"""Head-only scoring (qeval.eval.lm.QevalLM) against lm-eval's stock HFLM: per-request log-likelihoods
within float tolerance, accuracy and generations identical, for every task type qeval ships;
on the float model, a bitsandbytes model and a PEFT-wrapped one."""
import numpy as np
import pytest

from qeval.eval.evaluate import quiet_lm_eval, task_manager
from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS

TASKS = {"qeval_analogy": (8, 0), "qeval_similarity": (8, 0), "qeval_lee_ppl": (3, 0), "qeval_capitals": (4, 3)}


def _run(lm, task):
    from lm_eval import simple_evaluate

    limit, shots = TASKS[task]
    return simple_evaluate(model=lm, tasks=[task], task_manager=task_manager(False), limit=limit,
                           num_fewshot=shots, log_samples=True, bootstrap_iters=0, random_seed=0,
                           numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)


def _resps(res, task):
    return [[r[0] if isinstance(r, (list, tuple)) else r for r in s["resps"]] for s in res["samples"][task]]


def _compare(model, tok, batch_size, tasks=TASKS):
    from lm_eval.models.huggingface import HFLM

    from qeval.eval.lm import QevalLM

    quiet_lm_eval()
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
    from qeval.eval.lm import head_logits, split_model

    body, head, softcap = split_model(peft)
    assert softcap is None and head is lm.model.lm_head
    h = np.random.default_rng(0).standard_normal((3, 64)).astype("float32")
    import torch

    capped = head_logits(head, torch.tensor(h), 2.0)
    assert float(capped.abs().max()) <= 2.0


def test_tokenization_is_reused_across_loads(tiny_model_dir):
    from qeval.eval import lm as qlm

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

    from qeval.eval.evaluate import EvalSpec, evaluate
    from qeval.eval.suites import TaskSpec

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
    from qeval.eval.suites import TaskSpec

    assert TaskSpec("qeval_analogy", batch_size="auto").problems("t") == []
    assert TaskSpec("qeval_lee_ppl", batch_size=4, divergence=True).problems("t") == []
    assert [e.what for e in TaskSpec("qeval_analogy", batch_size="big").problems("t")] == ["t.batch_size"]
    assert len(TaskSpec("qeval_analogy", batch_size=0).problems("t")) == 1


def _direct(model, ctx, cont):
    """(log-likelihood, greedy) of `cont` after `ctx` from the model's own full forward, one sequence."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    rows = logp[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    return float(rows[range(len(cont)), cont].sum()), bool((rows.argmax(-1) == torch.tensor(cont)).all())


def _choice_requests(max_len=None):
    """Contexts with several continuations each: multi-token, one-token, repeated; plus one context
    whose branches do not fit `max_len` (scored row by row)."""
    ctxs = [[5, 9, 13], [7, 7, 8, 21, 30], [11], [3, 4, 5, 6, 7, 8]]
    conts = [[[40], [41, 42], [43, 44, 45], [41, 42]], [[2], [3], [4]], [[50, 51], [52]],
             [[60, 61, 62, 63], [64, 65, 66, 67]]]
    return [((f"c{i}", f"x{j}"), c, x) for i, (c, xs) in enumerate(zip(ctxs, conts)) for j, x in enumerate(xs)]


def test_choices_of_a_context_share_one_row(tiny_model_dir):
    """QevalLM scores all continuations of a context in one row (tree mask): each request's
    log-likelihood and greedy flag equal a direct forward of context + continuation, with fewer rows
    than requests through the model; a context too long for one row is scored by rows."""
    from qeval.eval.lm import QevalLM

    m = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("none"), "cpu")
    rec: list = []
    lm = QevalLM(pretrained=m.model, tokenizer=m.tokenizer, batch_size=2, device="cpu", recorder=rec,
                 max_length=12)  # the last context + its branches (6 + 3 + 3) = 12 fits; 13 would not
    reqs = _choice_requests()
    out = lm._loglikelihood_tokens(reqs)
    assert lm._tree is True
    for (_, ctx, cont), (ll, greedy) in zip(reqs, out, strict=True):
        want_ll, want_greedy = _direct(m.model, ctx, cont)
        assert ll == pytest.approx(want_ll, rel=1e-5, abs=1e-4) and greedy == want_greedy
    trees = [r for r in rec if r[0] == "forward" and len(r) == 4]
    assert sum(r[1].shape[0] for r in trees) == 4 < len(reqs)  # one row per context
    rec.clear()
    lm._max_length = 11  # now the last context needs 12 positions: its requests go row by row
    out2 = lm._loglikelihood_tokens(reqs)
    assert [a for a, _ in out2] == pytest.approx([a for a, _ in out], rel=1e-5, abs=1e-4)
    assert sum(r[1].shape[0] for r in rec if len(r) == 4) == 3
    assert sum(r[1].shape[0] for r in rec if len(r) == 3) == 2  # the two 4-token choices, by rows


def test_tree_rows_fall_back_when_the_model_ignores_the_mask(tiny_model_dir, caplog):
    """A model whose attention ignores a custom 4-D mask (flash-attention does) fails the self-check
    on the first group: QevalLM warns and scores row by row, with the right numbers."""
    from qeval.eval.lm import QevalLM

    m = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("none"), "cpu")
    lm = QevalLM(pretrained=m.model, tokenizer=m.tokenizer, batch_size=4, device="cpu")
    body = lm._split[0]
    plain = body.forward
    body.forward = lambda *a, attention_mask=None, position_ids=None, **k: plain(*a, **k)
    try:
        with caplog.at_level("WARNING", logger="qeval"):
            out = lm._loglikelihood_tokens(_choice_requests())
    finally:
        del body.forward
    assert lm._tree is False and "row by row" in caplog.text
    for (_, ctx, cont), (ll, greedy) in zip(_choice_requests(), out, strict=True):
        assert ll == pytest.approx(_direct(m.model, ctx, cont)[0], rel=1e-5, abs=1e-4)


def test_reference_log_probs_cached_bit_identical(peaked_dir, monkeypatch):
    """The baseline's log-probabilities are kept for the next variant on CPU (within
    QEVAL_REFERENCE_CACHE_MB): the KL from the cache equals, bit for bit, the KL recomputed without
    it; the cache never travels with a pickled reference (a Ray job)."""
    import pickle

    import torch

    from qeval.eval.divergence import Reference
    from qeval.eval.evaluate import EvalSpec, evaluate
    from qeval.eval.suites import TaskSpec

    r = resolve_model(str(peaked_dir))
    base, var = load_model(r, FORMATS.get("none"), "cpu"), load_model(r, FORMATS.get("bnb-nf4"), "cpu")
    task = TaskSpec("qeval_lee_ppl", limit=3, batch_size=2, divergence=True)
    monkeypatch.setenv("QEVAL_REFERENCE_CACHE_MB", "0")
    ref = evaluate(base, task, EvalSpec(bootstrap_iters=10), "reference").reference
    assert not ref.__dict__.get("_lp_cache")
    cold = evaluate(var, task, EvalSpec(bootstrap_iters=10), ref).divergence
    assert not ref.__dict__.get("_lp_cache")
    monkeypatch.setenv("QEVAL_REFERENCE_CACHE_MB", "1024")
    filled = evaluate(var, task, EvalSpec(bootstrap_iters=10), ref).divergence  # recomputed, then kept
    assert len(ref._lp_cache) == len(ref.hidden) == 3
    warm = evaluate(var, task, EvalSpec(bootstrap_iters=10), ref).divergence
    # kept from the baseline's own forwards while recording the reference
    ref2 = evaluate(base, task, EvalSpec(bootstrap_iters=10), "reference").reference
    assert len(ref2._lp_cache) == 3
    own = evaluate(var, task, EvalSpec(bootstrap_iters=10), ref2).divergence
    for d in (filled, warm, own):
        assert d.metrics() == cold.metrics()
    recompute = Reference(ref.hidden, ref.weight, ref.bias, ref.softcap)  # nothing kept: computes
    for key, (lp, top) in ref2._lp_cache.items():
        want_lp, want_top = recompute.log_probs(key)
        assert torch.equal(lp, want_lp) and torch.equal(top, want_top)
    assert "_lp_cache" not in pickle.loads(pickle.dumps(ref)).__dict__
