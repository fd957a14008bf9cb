"""Integration tier: the real embedded SmolLM2-135M through every format, real bitsandbytes and lm-eval."""
import pytest

from qeval.stats.compare import memory_frame, results_frame
from qeval.models.load import resolve_model
from qeval.quant.formats import DEFAULT_FORMATS
from qeval.report.build import render
from qeval.run.runner import Plan, run_plan
from qeval.store.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("integration") / "store.sqlite"
    summary = run_plan(Plan(suite="smoke", device="cpu"), path, progress=lambda s: None)
    assert not summary.failed and len(summary.computed) == 4 * len(DEFAULT_FORMATS)
    with Store(path) as store:
        return list(store.records())


def test_embedded_model_is_converted_once():
    first = resolve_model("smollm2-135m")
    assert first.source == "embedded" and (first.path / "model.safetensors").is_file()
    assert (first.path / "qeval-source.json").is_file()  # records the GGUF's sha256
    again = resolve_model("smollm2-135m")
    assert again.fingerprint == first.fingerprint and again.path == first.path


def test_bytes_per_format_against_theory(smoke_store):
    mem = memory_frame(smoke_store).set_index("quant")
    base = mem.loc["none", "total_bytes"]
    assert 530e6 < base < 545e6  # 134.5M float32 parameters (tied embedding counted once)
    # the tied 49152x576 embedding stays float32 in every format: 113.2 MB
    assert (mem["unquantized_bytes"] > 113e6).all()
    assert mem.loc["bnb-nf4-dq", "total_bytes"] < mem.loc["bnb-nf4", "total_bytes"] < mem.loc["bnb-int8", "total_bytes"] < base
    assert mem.loc["bnb-nf4-dq", "theory_bits_per_weight"] == pytest.approx(4.127, abs=1e-3)
    for q in DEFAULT_FORMATS:
        assert mem.loc[q, "ratio_to_theory"] == pytest.approx(1.0, abs=0.01)  # codebooks are <1% here
        assert mem.loc[q, "load_s"] > 0


def test_quantization_costs_perplexity(smoke_store):
    res = results_frame(smoke_store)
    ppl = res[(res.task == "qeval_lee_ppl") & (res.metric == "word_perplexity")].set_index("quant")["value"]
    # 4-bit weights cost a 135M model real perplexity on news text; int8 much less than 4-bit
    for q in ("bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq"):
        assert ppl[q] > ppl["none"] * 1.05, (q, ppl[q], ppl["none"])
    assert ppl["bnb-int8"] < ppl["bnb-nf4"]
    acc = res[(res.task == "qeval_analogy") & (res.metric == "acc")]
    assert (acc["n"] == 16).all() and acc["value"].between(0, 1).all()


def test_report_from_real_records(smoke_store, tmp_path):
    paths = render(results_frame(smoke_store), memory_frame(smoke_store), {"title": "t"}, tmp_path)
    md = (tmp_path / "report.md").read_text()
    for q in DEFAULT_FORMATS:
        assert q in md
    assert {p.name for p in paths} >= {"report.md", "report.html", "results.csv", "recovery.png", "memory_vs_score.png"}


def test_divergence_and_new_tasks_on_the_real_model(smoke_store):
    div = {r.variant.quant: r.divergence for r in smoke_store if r.task.name == "qeval_lee_ppl"}
    # the baseline records the reference, or (reference already cached) measures the noise floor: 0
    assert div["none"].role == "reference" or div["none"].kl_max == 0.0
    # 4-bit moves the distribution far more than int8; both are real, positive divergences
    assert 0 < div["bnb-int8"].kl_mean < div["bnb-nf4"].kl_mean
    assert div["bnb-nf4"].top1_agree < div["bnb-int8"].top1_agree < 1
    tasks = {r.task.name for r in smoke_store}
    assert tasks == {"qeval_analogy", "qeval_lee_ppl", "qeval_capitals", "qeval_similarity"}
    caps = [r for r in smoke_store if r.task.name == "qeval_capitals" and r.variant.quant == "none"][0]
    assert caps.primary_metric == "exact_match" and caps.n == 8
