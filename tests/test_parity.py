"""GGUF parity (qeval.eval.parity, qeval parity): the comparison's numbers, the GGUF file writer, the
type map, the command's refusals, and (slow, with a built llama.cpp runtime) the real comparison."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qeval.eval import parity


def _rand_lp(rng, n, v):
    x = rng.normal(size=(n, v)) * 3
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_compare_against_an_independent_computation():
    from scipy.stats import entropy

    rng = np.random.default_rng(0)
    a, b = _rand_lp(rng, 40, 17), _rand_lp(rng, 40, 17)
    tgt = rng.integers(0, 17, size=40)
    got = parity.compare(a, b, tgt)
    kl = np.array([entropy(np.exp(a[i]), np.exp(b[i])) for i in range(40)])
    assert got["kl_sim_runtime"] == pytest.approx(kl.mean(), rel=1e-9)
    assert got["kl_se"] == pytest.approx(kl.std(ddof=1) / np.sqrt(40), rel=1e-9)
    assert got["top1"] == pytest.approx(np.mean([a[i].argmax() == b[i].argmax() for i in range(40)]))
    nll_b = -np.mean([b[i, tgt[i]] for i in range(40)])
    assert got["ppl_runtime"] == pytest.approx(np.exp(nll_b), rel=1e-9)
    same = parity.compare(a, a, tgt)
    assert same["kl_sim_runtime"] == pytest.approx(0, abs=1e-12) and same["top1"] == 1.0
    assert parity.log_softmax(np.log(np.exp(a) * 5)) == pytest.approx(a)  # shift invariance


def _template(path, w_q, w_norm):
    from gguf import GGUFWriter

    wr = GGUFWriter(str(path), "llama")
    wr.add_block_count(1)
    wr.add_string("tokenizer.ggml.model", "llama")
    wr.add_array("tokenizer.ggml.tokens", ["<a>", "<b>"])
    wr.add_tensor("blk.0.attn_q.weight", w_q)
    wr.add_tensor("blk.0.attn_norm.weight", w_norm)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def test_write_gguf_repacks_named_tensors_and_keeps_metadata(tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    norm = rng.normal(size=64).astype(np.float32)
    _template(tmp_path / "t.gguf", w, norm)
    census = parity.write_gguf(tmp_path / "t.gguf", tmp_path / "q8.gguf", {"blk.0.attn_q.weight": "Q8_0"})
    assert census == {"Q8_0": 1, "F32": 1}
    r = GGUFReader(str(tmp_path / "q8.gguf"))
    assert r.get_field("tokenizer.ggml.tokens").contents() == ["<a>", "<b>"]
    assert r.get_field("llama.block_count").contents() == 1
    t = {x.name: x for x in r.tensors}
    back = dequantize(np.asarray(t["blk.0.attn_q.weight"].data), t["blk.0.attn_q.weight"].tensor_type).reshape(8, 64)
    # Q8_0 from first principles: per 32 weights, d = max|w| / 127 stored in fp16, codes round(w / d)
    blocks = w.reshape(-1, 32)
    d = (np.abs(blocks).max(1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    ref = (np.round(blocks / np.where(d == 0, 1, d)) * d).reshape(8, 64)
    assert np.abs(back - ref).max() <= 1e-6 * np.abs(w).max() + np.abs(d).max() * 1.01  # at most one code apart
    assert np.abs(back - w).max() <= d.max() / 2 * 1.01
    assert np.array_equal(np.asarray(t["blk.0.attn_norm.weight"].data), norm)
    # the float file is the template's values exactly
    parity.write_gguf(tmp_path / "q8.gguf", tmp_path / "f32.gguf", {})
    f = {x.name: x for x in GGUFReader(str(tmp_path / "f32.gguf")).tensors}
    assert np.array_equal(np.asarray(f["blk.0.attn_q.weight"].data).reshape(8, 64), back)


def test_gguf_types_names_every_linear_by_the_simulations_rule(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n = model.config.num_hidden_layers
    types = parity.gguf_types("gguf:q4_0", model)
    assert len(types) == 7 * n and set(types.values()) == {"Q4_0"}
    assert f"blk.{n - 1}.ffn_down.weight" in types and "blk.0.attn_q.weight" in types


def _qeval(*args, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "qeval", "parity", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_the_command_refuses_without_a_runtime_and_for_a_non_gguf_format(tmp_path):
    r = _qeval("--out", str(tmp_path / "o"), env={"QEVAL_LLAMA_CPP_DIR": str(tmp_path / "none")})
    assert r.returncode == 2 and "runtime absent" in r.stderr and "qeval parity --setup" in r.stderr
    r = _qeval("--formats", "nf4", env={"QEVAL_LLAMA_CPP_DIR": str(tmp_path / "none")})
    assert r.returncode == 2 and "gguf:" in r.stderr
    assert not (tmp_path / "o").exists()


def _runtime_or_skip():
    from qeval.quant.backends import llama_runtime

    reason = llama_runtime.missing_reason()
    if reason:
        pytest.skip(reason + ("; no toolchain: " + ", ".join(llama_runtime.toolchain_missing())
                              if llama_runtime.toolchain_missing() else ""))


@pytest.mark.slow
def test_runtime_agrees_with_the_simulation_on_the_real_model(tmp_path):
    _runtime_or_skip()
    res = parity.run_parity("smollm2-135m", ["gguf:q8_0"], n_docs=1, ctx=64, work_dir=tmp_path, log=lambda s: None)
    floor, own, q8 = res.rows
    assert floor.tokens == own.tokens == q8.tokens == 63
    # the float path: same weights, only accumulation order differs
    assert floor.kl_sim_runtime < 1e-4 and floor.top1 > 0.98
    assert abs(floor.ppl_ratio - 1) < 1e-3
    # Q8_0 in llama.cpp also quantizes activations to 8 bits; still far closer than the format's own damage
    assert q8.kl_sim_runtime < 0.02 and q8.top1 > 0.9
    assert q8.file_types["Q8_0"] == 7 * 30


def test_a_plans_parity_section_is_typed_and_checked():
    """`parity:` in a plan: unknown keys, non-GGUF or unknown formats and out-of-range sizes are plan
    errors, reported together before anything runs."""
    from qeval.core.errors import QevalError
    from qeval.run.plan import ParitySpec, plan_from, validate

    plan = plan_from({"formats": ["none"], "parity": {"formats": ["gguf:q4_0"], "docs": 2}})
    assert plan.parity == ParitySpec(formats=("gguf:q4_0",), docs=2, ctx=256)
    with pytest.raises(QevalError) as e:
        plan_from({"parity": {"formats": ["gguf:q4_0"], "doc": 2}})
    assert "doc" in str(e.value) and "docs" in str(e.value)  # a "did you mean"
    bad = plan_from({"formats": ["none"], "parity": {"formats": ["bnb-nf4", "gguf:q4_9"], "docs": 51, "ctx": 1}})
    with pytest.raises(QevalError) as e:
        validate(bad)
    errors = [str(x) for x in getattr(e.value, "errors", [e.value])]
    assert any("bnb-nf4" in x and "gguf:" in x for x in errors) and any("gguf:q4_9" in x for x in errors)
    assert any("parity.docs" in x for x in errors) and any("parity.ctx" in x for x in errors)


def _fake_result(model):
    rows = [parity.ParityRow("float (F32 file)", {"F32": 272}, 63, 1e-6, 2e-7, 1.0, 37.0, 37.0),
            parity.ParityRow("gguf:q4_0", {"F32": 62, "Q4_0": 210}, 63, 0.004, 1e-4, 0.96, 46.2, 46.7,
                             kl_base_sim=0.38, flagged=True)]
    return parity.ParityResult(model, 1, 64, 1e-6, 1e-5, rows, runtime="llama-cpp-python==test")


def test_the_parity_stage_stores_one_record_and_the_report_shows_it(tmp_path, monkeypatch):
    """The stage (qeval.run.parity_stage) runs the check once per GGUF-sourced model, stores what the
    check returned as a ParityRecord, computes nothing the second time, skips a model that is not
    GGUF-sourced with its reason; the report's section and parity.csv show the stored numbers."""
    from types import SimpleNamespace

    from qeval.quant.backends import llama_runtime
    from qeval.run import parity_stage as stage
    from qeval.run.plan import ParitySpec
    from qeval.store.store import Store

    calls = []
    monkeypatch.setattr(llama_runtime, "missing_reason", lambda: None)
    monkeypatch.setattr(parity, "run_parity", lambda m, f, d, c, w, log: calls.append((m, f, d, c)) or _fake_result(m))
    gguf = SimpleNamespace(spec="smollm2-135m", source="embedded", path=tmp_path, fingerprint="f" * 16)
    folder = SimpleNamespace(spec="/some/folder", source="folder", path=tmp_path, fingerprint="g" * 16)
    lines = []
    spec = ParitySpec(formats=("gguf:q4_0",), docs=1, ctx=64)
    with Store(tmp_path / "s.sqlite") as store:
        done, failed = stage.parity_stage([gguf, folder], spec, store, lines.append)
        assert len(done) == 1 and not failed and calls == [("smollm2-135m", ["gguf:q4_0"], 1, 64)]
        assert any("skipped parity /some/folder" in x and "GGUF" in x for x in lines)
        again, _ = stage.parity_stage([gguf], spec, store, lines.append)
        assert again == [] and len(calls) == 1
        (rec,) = store.parity_records()
    assert rec.rows[1]["kl_sim_runtime"] == 0.004 and rec.floor_kl == 1e-6 and rec.settings["docs"] == 1
    from qeval.report.sections.parity import parity_section
    from qeval.report.doc import to_markdown

    section = parity_section((rec,))
    md = to_markdown(section.blocks)
    assert "llama-cpp-python==test" in md and "| gguf:q4_0 | F32 62 Q4_0 210 | 0.004 |" in md
    assert "Departs beyond the noise floor: gguf:q4_0" in md and "gguf:q4_0 1%" in md  # 0.004 / 0.38
    (banner,) = section.banners  # the summary names what departs
    assert "gguf:q4_0 (KL 0.004, 1% of its own KL)" in banner and "llama-cpp-python==test" in banner
    csv = section.files["parity.csv"].decode()
    assert "gguf:q4_0" in csv and "Q4_0:210" in csv


def test_the_parity_stage_is_skipped_with_its_reason_without_a_runtime(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from qeval.quant.backends import llama_runtime
    from qeval.run import parity_stage as stage
    from qeval.run.plan import ParitySpec
    from qeval.store.store import Store

    monkeypatch.setenv("QEVAL_LLAMA_CPP_DIR", str(tmp_path / "none"))
    lines = []
    gguf = SimpleNamespace(spec="smollm2-135m", source="embedded", path=tmp_path, fingerprint="f" * 16)
    with Store(tmp_path / "s.sqlite") as store:
        assert stage.parity_stage([gguf], ParitySpec(), store, lines.append) == ([], [])
        assert list(store.parity_records()) == []
    assert any("skipped parity smollm2-135m" in x and llama_runtime.SETUP_COMMAND in x for x in lines)
