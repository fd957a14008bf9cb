"""Format backends (qeval.quant.formats): names, requirements, bytes against first-principles counts, GGUF
numerics against an independent implementation, shape validation. Tiny model, CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qeval.quant.backend as backend
from qeval.core.errors import QevalError
from qeval.models.load import linear_in_features, load_model
from qeval.quant.formats import BACKENDS, FORMATS, quantizable_linears
from qeval.quant.backends.gguf import roundtrip
from qeval.report.sections.formats import pareto_front
from kl_run import run_kl_and_report

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def baseline(resolved):
    lm = load_model(resolved, FORMATS.get("none"), "cpu")
    ids = lm.tokenizer("The Australian bushfires forced residents to leave their homes.", return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, lm.model(ids).logits


def _shapes(lm):
    return [(m.out_features, m.in_features) for n, m in lm.model.named_modules() if n.endswith(LINEAR)]


# ----------------------------------------------------------------------------- names

def test_presets_and_backend_names_are_the_same_formats():
    assert FORMATS.get("bnb:nf4:dq") is FORMATS.get("bnb-nf4-dq")
    assert FORMATS.get("bnb:int8") is FORMATS.get("bnb-int8")
    # presets' specs carry no backend-only fields: their record keys are unchanged
    spec = FORMATS.get("bnb-nf4").spec(torch.float32)
    assert set(spec) == {"name", "backend", "compute_dtype", "options", "runtime"}
    assert FORMATS.get("torchao:int4-wo").name == "torchao:int4-wo:g32"  # the default group is explicit


def test_backend_spec_carries_options_and_package_version():
    import importlib.metadata

    a, b = FORMATS.get("quanto:int4:g32").spec(torch.float32), FORMATS.get("quanto:int4:g64").spec(torch.float32)
    assert a["options"]["group"] == 32 and b["options"]["group"] == 64
    assert a["backend_versions"] == {"optimum-quanto": importlib.metadata.version("optimum-quanto")}


@pytest.mark.parametrize("name,needles", [
    ("torchoa:int8-wo", ["torchoa", "did you mean 'torchao'"]),
    ("gguf:q4_2", ["q4_2", "q4_0", "q4_k_m"]),
    ("gguf:q4_k_m:x", ["x", "pure"]),
    ("quanto:int4:64", ["64", "gN"]),
    ("torchao:int8-wo:g32", ["g32", "no options"]),
    ("bnb:nf4:dq:x", ["dq:x"]),
])
def test_bad_names_say_what_would_work(name, needles):
    with pytest.raises(QevalError) as e:
        FORMATS.get(name)
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert name not in FORMATS


def test_listing_names_every_backend_scheme():
    names = list(FORMATS)
    assert "bnb-nf4" in names and "gguf:q4_0" in names and "torchao:int8-wo" in names and "quanto:int4" in names
    assert all(FORMATS.get(n) is not None for n in names)


def test_missing_package_is_one_line_with_the_extra(monkeypatch):
    real = backend.find_spec
    monkeypatch.setattr(backend, "find_spec", lambda m: None if m.startswith("torchao") else real(m))
    with pytest.raises(QevalError) as e:
        FORMATS.get("torchao:int8-wo").require("cpu")
    assert "pip install 'qeval[torchao]'" in str(e.value) and "\n" not in str(e.value)
    FORMATS.get("gguf:q4_0").require("cpu")  # others unaffected


def test_missing_package_stops_run_before_the_store(monkeypatch, tmp_path, tiny_model_dir, capsys):
    from qeval.cli import main

    real = backend.find_spec
    monkeypatch.setattr(backend, "find_spec", lambda m: None if m.startswith("optimum") else real(m))
    store = tmp_path / "store.sqlite"
    code = main(["run", "--model", str(tiny_model_dir), "--formats", "none,quanto:int8", "--suite", "smoke",
                 "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'qeval[quanto]'" in err and "Traceback" not in err
    assert not store.exists()


def test_every_backend_declares_its_needs():
    for name, b in BACKENDS.items():
        if name == "none":
            continue  # the baseline: a backend with a label and a colour, no schemes
        assert b.extra and b.schemes and b.calibration == (name in ("gptq", "awq"))  # GPTQ and AWQ need calibration text
        for s in b.schemes:
            f = FORMATS.get(f"{name}:{s}")
            assert f.kernel in ("real", "simulated") and f.bits_per_weight is not None


# ----------------------------------------------------------------------------- shapes

def test_group_sizes_checked_against_layer_widths(tiny_model_dir):
    widths = linear_in_features(tiny_model_dir)  # hidden 64, 4 heads x 16, intermediate 128
    assert widths == {"q/k/v/gate/up_proj": 64, "o_proj": 64, "down_proj": 128}
    assert FORMATS.get("quanto:int4:g32").check_shapes(widths, "tiny") == []
    (err,) = FORMATS.get("quanto:int4:g48").check_shapes(widths, "tiny")
    assert "48" in str(err) and "down_proj (128)" in str(err) and "32" in str(err)  # what would divide


def test_real_model_widths_rule_out_group_128():
    smol = {"q/k/v/gate/up_proj": 576, "o_proj": 576, "down_proj": 1536}
    assert FORMATS.get("quanto:int4:g128").check_shapes(smol, "smollm2")
    assert not FORMATS.get("quanto:int4:g64").check_shapes(smol, "smollm2")
    assert not FORMATS.get("gguf:q4_0").check_shapes(smol, "smollm2")


def test_bad_group_stops_run_before_the_store(tmp_path, tiny_model_dir, capsys):
    from qeval.cli import main

    store = tmp_path / "store.sqlite"
    code = main(["run", "--model", str(tiny_model_dir), "--formats", "torchao:int4-wo:g48", "--suite", "smoke",
                 "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "group/block size 48" in err and not store.exists()


# ----------------------------------------------------------------------------- bytes and numerics

def _packed_bytes(name: str, shapes) -> int:
    """Bytes of the quantized weights + their state, from each format's layout (independent of qeval)."""
    if name == "torchao:int8-wo" or name == "torchao:int8-dyn":
        return sum(o * i + o * (4 + 1) for o, i in shapes)  # int8 codes, fp32 scale + int8 zero point per row
    if name.startswith("torchao:int4-wo"):
        g = int(name.rsplit(":g", 1)[1])
        return sum(o * i + o * (i // g) * 5 for o, i in shapes)  # unpacked: one byte per code
    if name == "quanto:int8":
        return sum(o * i + 4 * o for o, i in shapes)
    if name.startswith("quanto:int"):
        bits, g = int(name[10]), int(name.rsplit(":g", 1)[1])
        return sum(o * i * bits // 8 + 8 * (o * i // g) for o, i in shapes)  # packed codes, fp32 scale + shift
    raise KeyError(name)


@pytest.mark.parametrize("name", ["torchao:int8-wo", "torchao:int8-dyn", "torchao:int4-wo:g32", "quanto:int8",
                                  "quanto:int4:g32", "quanto:int2:g32"])
def test_tensor_subclass_bytes(resolved, baseline, name):
    fmt = FORMATS.get(name)
    lm = load_model(resolved, fmt, "cpu")
    fp = lm.footprint
    shapes = _shapes(lm)
    n = sum(o * i for o, i in shapes)
    assert fp.quantized_params == n
    assert fp.quantized_weight_bytes + fp.quant_state_bytes == _packed_bytes(name, shapes)
    theory = fp.theory_bytes - fp.unquantized_bytes
    assert theory == pytest.approx(sum(o * i * fmt.bits_per_weight(i) / 8 for o, i in shapes), abs=len(shapes))
    measured = fp.quantized_weight_bytes + fp.quant_state_bytes
    if fmt.kernel == "real":  # packed storage: measured within 2% of theory
        assert measured / theory == pytest.approx(1, abs=0.02)
    else:  # simulated: unpacked codes cost ~2x the packed theory, and the report shows both
        assert measured / theory > 1.5
    ids, ref = baseline
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert torch.isfinite(logits).all() and 0 < (logits - ref).abs().max() < 1.5


GGUF_BLOCK_BYTES = {"q8_0": 34, "q5_1": 24, "q5_0": 22, "q4_1": 20, "q4_0": 18}  # per 32 weights (ggml-common.h)


@pytest.mark.parametrize("qtype", sorted(GGUF_BLOCK_BYTES))
def test_gguf_simulation(resolved, baseline, qtype):
    lm = load_model(resolved, FORMATS.get(f"gguf:{qtype}"), "cpu")
    fp = lm.footprint
    n = sum(o * i for o, i in _shapes(lm))
    assert fp.quantized_params == n
    assert fp.packed_bytes == n // 32 * GGUF_BLOCK_BYTES[qtype]
    assert fp.packed_bytes * 8 / n == pytest.approx(FORMATS.get(f"gguf:{qtype}").bits_per_weight(64))
    assert fp.quantized_weight_bytes == 4 * n  # the model in memory is float32: simulated
    for _, m in quantizable_linears(lm.model):  # every block holds at most 2^bits distinct values
        blocks = m.weight.detach().reshape(-1, 32)
        distinct = max(len(torch.unique(b)) for b in blocks[:50])
        assert distinct <= 2 ** int(qtype[1])


def test_gguf_q8_0_matches_reference_arithmetic():
    """ggml's quantize_row_q8_0_ref, written out: d = amax/127 (fp32) for the codes, stored as fp16."""
    torch.manual_seed(0)
    w = torch.randn(16, 96) * 0.05
    x = w.numpy().reshape(-1, 32).astype(np.float32)
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    q = x * np.where(d == 0, 0, 1 / np.where(d == 0, 1, d))
    q = np.sign(q) * np.floor(np.abs(q) + 0.5)  # round half away from zero
    expected = (q * d.astype(np.float16).astype(np.float32)).reshape(w.shape)
    got, nbytes = roundtrip(w, "q8_0")
    assert nbytes == 16 * 96 // 32 * 34
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("qtype", sorted(GGUF_BLOCK_BYTES))
def test_gguf_requantizing_is_exact(qtype):
    """A weight already on a type's grid comes back unchanged: why the embedded model (from a Q4_1
    file) re-quantized to gguf:q4_1 has KL exactly 0."""
    torch.manual_seed(1)
    once, _ = roundtrip(torch.randn(8, 64) * 0.02, qtype)
    twice, _ = roundtrip(once, qtype)
    assert torch.equal(once, twice)


# ----------------------------------------------------------------------------- pre-quantized baselines

@pytest.fixture(scope="module")
def planted_q4_1(tiny_model_dir, tmp_path_factory):
    """The tiny model with every linear weight rounded to GGUF Q4_1 (as the embedded model's are),
    and larger weights so that next-token distributions are peaked and KLs measurable."""
    from conftest import build_tiny_model
    from transformers import AutoModelForCausalLM

    planted = build_tiny_model(tmp_path_factory.mktemp("q4_1"), init_range=0.5)
    model = AutoModelForCausalLM.from_pretrained(planted)
    with torch.no_grad():
        for _, m in quantizable_linears(model):
            m.weight.copy_(roundtrip(m.weight, "q4_1")[0])
    model.save_pretrained(planted)
    return planted


def test_grid_detector_flags_a_planted_model_and_not_a_float_one(tiny_model_dir, planted_q4_1):
    from qeval.quant.detect import banner, grid_census

    float_census = grid_census(tiny_model_dir)
    assert float_census["tensors"] == 14 and float_census["gridded"] == 0
    assert banner(float_census) == ""
    census = grid_census(planted_q4_1)
    from safetensors import safe_open

    with safe_open(str(planted_q4_1 / "model.safetensors"), "pt") as f:  # blocks counted independently
        n_blocks = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] // 32
                       for k in f.keys() if k.endswith("proj.weight"))
    assert census["blocks"] == census["fit"] == n_blocks and census["grids"] == {"4-bit/32": 14}
    assert "already quantized" in banner(census, "planted")


def test_report_shows_the_banner_and_q4_1_on_its_own_grid_gives_kl_0(planted_q4_1, tmp_path, capsys):
    """End to end: run + report on a Q4_1-planted model. Re-quantizing to gguf:q4_1 changes no weight
    (KL exactly 0, checked from the stored record), gguf:q4_0 does (KL > 0)."""
    records, md, out = run_kl_and_report(planted_q4_1, "none,gguf:q4_1,gguf:q4_0", tmp_path, capsys)
    kl = {q: r.divergence.kl_mean if r.divergence else None for q, r in records.items()}
    assert kl["gguf:q4_1"] == 0.0 and kl["gguf:q4_0"] > 0
    assert "Format landscape across backends" in md and "already quantized" in md
    assert "Re-quantizing it to gguf:q4_1 gives KL 0" in md
    # the banner opens the report, in the summary before the long tables
    assert md.index("## Summary") < md.index("already quantized") < md.index("## About this run") < md.index("## Accuracy by task")
    assert "already quantized" in (out / "report.html").read_text()
    assert (out / "formats_pareto.png").read_bytes()[:4] == b"\x89PNG"
    land = (out / "formats.csv").read_text().splitlines()
    assert len(land) == 4  # header + 3 formats


def test_pareto_front_matches_brute_force():
    import random

    rng = random.Random(0)
    pts = [(rng.choice([2, 4, 4.5, 5, 8, 16]), rng.random(), str(i)) for i in range(40)]
    front = pareto_front(pts)
    dominated = {p for p in pts for q in pts if q != p and q[0] <= p[0] and q[1] < p[1]}
    # every non-dominated x keeps its best point; nothing on the front is dominated
    assert not set(front) & dominated
    assert {p[0] for p in front} <= {p[0] for p in pts if p not in dominated}


# ----------------------------------------------------------------------------- quanto's unpack

@pytest.mark.parametrize("bits", [4, 2])
def test_quanto_unpack_is_served_without_compiling_and_matches_the_bit_layout(resolved, baseline, monkeypatch, bits):
    """quanto's CPU unpack is a C++ extension torch JIT-compiles on first use (~53 s in a fresh
    venv); qeval serves it from the same torch ops instead. Checked: no compiler is asked for
    (loading the extension fails here) while a quanto:int{bits} model runs, and the unpacked codes
    equal numpy's bit arithmetic (value i of a byte is bits [bits*i, bits*(i+1)), concatenated
    along dim 0). The C++ kernel itself agreed bit for bit on 4-bit and 2-bit bytes of three
    shapes when compared by hand (2026-12-04)."""
    pytest.importorskip("optimum.quanto")
    import optimum.quanto.library.extensions.extension as ext

    def no_compiler(*a, **k):
        raise AssertionError("quanto's C++ extension was built")

    monkeypatch.setattr(ext, "load", no_compiler)
    lm = load_model(resolved, FORMATS.get(f"quanto:int{bits}:g32"), "cpu")
    ids, _ = baseline
    with torch.no_grad():
        assert torch.isfinite(lm.model(ids).logits).all()
    packed = torch.randint(0, 256, (5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = packed.numpy()
    want = np.concatenate([(x >> (bits * i)) & ((1 << bits) - 1) for i in range(8 // bits)], 0)
    got = torch.ops.quanto.unpack(packed, bits)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want)


def test_a_backend_package_is_found_without_importing_it():
    """Plan validation asks whether each backend's modules are installed; a dotted name must not
    import its parents (torchao.quantization imported torchao and torch._dynamo: 5.7 s of every
    warm `qeval run`). Checked in a fresh interpreter: found, and nothing of it in sys.modules."""
    import subprocess
    import sys

    code = ("import sys; from qeval.quant.backend import find_spec; "
            "print(find_spec('torchao.quantization') is not None, find_spec('torchao.no_such_module') is None, "
            "find_spec('no_such_package.x') is None, any(m.split('.')[0] == 'torchao' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True", "False"]
