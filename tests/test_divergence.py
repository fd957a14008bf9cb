"""KL / top-1 agreement: exact against both models' own logits, zero noise floor, paired statistics."""
import math
import json

import numpy as np
import pytest

from qeval.stats.paired import compare_pair
from qeval.eval.divergence import Capture, Reference, exact_kl
from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS
from qeval.eval.suites import DATA_DIR


@pytest.fixture(scope="module")
def docs(tiny_model_dir):
    tok = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("none"), "cpu").tokenizer
    texts = [json.loads(x)["text"] for x in (DATA_DIR / "lee_news.jsonl").read_text().splitlines()[:3]]
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False).input_ids for t in texts]


def _run(model, docs, reference=None):
    import torch

    with Capture(model, reference) as cap, torch.no_grad():
        for ids in docs:
            model(torch.tensor([ids]))
    return cap


@pytest.fixture(scope="module")
def peaked_model_dir(tmp_path_factory):
    """The tiny model with larger weights: its next-token distributions are peaked like a trained
    LM's (the default init gives near-uniform ones, where every KL is ~1e-7)."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("peaked"), init_range=0.5)


def test_reference_kl_equals_exact_full_vocabulary_kl(peaked_model_dir, docs, tmp_path):
    r = resolve_model(str(peaked_model_dir))
    base = load_model(r, FORMATS.get("none"), "cpu").model
    ref = _run(base, docs).reference()
    ref.save(tmp_path / "ref.safetensors")
    ref = Reference.load(tmp_path / "ref.safetensors")  # through the stored form
    for fmt in ("bnb-nf4", "bnb-int8"):
        variant = load_model(r, FORMATS.get(fmt), "cpu").model
        got = _run(variant, docs, ref).result()
        exact = exact_kl(base, variant, docs, "cpu")
        assert got.tokens == exact.size == sum(len(d) - 1 for d in docs)
        assert got.kl_mean > 1e-3
        assert abs(got.kl_mean - exact.mean()) / exact.mean() < 1e-3  # well under the 1% asked for
        assert got.kl_p99 == pytest.approx(np.percentile(exact, 99), rel=1e-2)
        assert 0 < got.top1_agree <= 1


def test_baseline_against_itself_is_exactly_zero(tiny_model_dir, docs):
    r = resolve_model(str(tiny_model_dir))
    ref = _run(load_model(r, FORMATS.get("none"), "cpu").model, docs).reference()
    again = _run(load_model(r, FORMATS.get("none"), "cpu").model, docs, ref).result()  # a second load
    assert again.kl_mean == 0.0 and again.kl_max == 0.0
    assert again.top1_agree == 1.0 and again.ppl_ratio == 1.0


def test_unknown_windows_and_batches_are_counted_not_compared(tiny_model_dir, docs):
    import torch

    r = resolve_model(str(tiny_model_dir))
    model = load_model(r, FORMATS.get("none"), "cpu").model
    ref = _run(model, docs[:1]).reference()
    cap = _run(model, docs, ref)
    assert cap.unmatched == len(docs) - 1 and cap.result().tokens == len(docs[0]) - 1
    with Capture(model, ref) as cap2, torch.no_grad():
        model(torch.tensor([docs[0][:10], docs[0][:10]]))
    assert cap2.batched == 1 and cap2.result() is None


def _mcnemar_p(rw, wr):
    """Independent exact McNemar: two-sided, the discordant pairs against Binomial(n, 1/2)."""
    n = rw + wr
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(rw, wr) + 1)) / 2 ** n)


def test_mcnemar_exact_values():
    for rw, wr in [(0, 0), (5, 5), (6, 0), (10, 2), (4, 0), (9, 2)]:
        base = [{"doc_id": i, "doc_hash": str(i), "acc": 1.0 if i < rw else 0.0} for i in range(40)]
        var = [{**b, "acc": 0.0 if b["doc_id"] < rw else (1.0 if rw <= b["doc_id"] < rw + wr else 0.0)} for b in base]
        # McNemar's exact p is the divergence table's extra column (the verdict's p: Tango's score test)
        assert compare_pair(base, var, "acc", True).mcnemar_p == pytest.approx(_mcnemar_p(rw, wr))


def test_paired_flips_and_interval():
    base = [{"doc_id": i, "doc_hash": str(i), "acc": float(i % 2 == 0)} for i in range(40)]
    # the variant gets documents 0,2,4,6 wrong (right->wrong) and 1 right (wrong->right)
    var = [{**b, "acc": 0.0 if b["doc_id"] in (0, 2, 4, 6) else (1.0 if b["doc_id"] == 1 else b["acc"])} for b in base]
    out = compare_pair(base, var, "acc", True)
    assert (out.right_to_wrong, out.wrong_to_right, out.flips) == (4, 1, 5)
    assert out.delta == pytest.approx(-3 / 40)
    assert out.ci_lo <= out.delta <= out.ci_hi
    assert out.mcnemar_p == pytest.approx(_mcnemar_p(4, 1))
    with pytest.raises(ValueError, match="differs"):
        compare_pair(base, [{**var[0], "doc_hash": "other"}], "acc", True)


def test_bf16_reference_is_recomputed_in_bf16(peaked_model_dir, docs):
    """A bf16 baseline against its own reference is exactly 0 (its logits are recomputed in bf16, not
    float32), and a bf16 model against a float32 reference gives the KL of both models' own logits."""
    import torch

    r = resolve_model(str(peaked_model_dir))
    bf16 = lambda: load_model(r, FORMATS.get("none"), "cpu", torch.bfloat16).model
    ref = _run(bf16(), docs).reference()
    assert ref.logits_dtype == "bfloat16"
    again = _run(bf16(), docs, ref).result()
    assert again.kl_max == 0.0 and again.top1_agree == 1.0
    fp32 = load_model(r, FORMATS.get("none"), "cpu").model
    got = _run(bf16(), docs, _run(fp32, docs).reference()).result()
    exact = exact_kl(fp32, bf16(), docs, "cpu")
    assert got.kl_mean > 0 and abs(got.kl_mean - exact.mean()) / exact.mean() < 1e-3
