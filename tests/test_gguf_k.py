"""GGUF K-quants (qeval.quant.backends.gguf_k): llama.cpp's per-tensor type rules and shape fallback, written
out by hand here; llama.cpp's quantizer (ggml through ctypes) against gguf's independent Python code
and a naive quantizer; bytes against the block layouts of ggml-common.h. Tiny models, CPU.

The tests that call the quantizer need the ggml library (`qeval setup --backend gguf-k`) and are
skipped with that reason where it is not built."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qeval.core.errors import QevalError
from qeval.quant.formats import FORMATS, measure_footprint, quantizable_linears
from qeval.quant.backends import ggml_lib
from qeval.quant.backends.gguf_k import fallback, tensor_types, use_more_bits
from kl_run import run_kl_and_report

needs_ggml = pytest.mark.skipif(not ggml_lib.available(),
                                reason="llama.cpp's ggml library is not built: run `qeval setup --backend gguf-k`")

# bytes per block and weights per block, from the block structs of ggml-common.h (written out, not imported)
LAYOUT = {"Q2_K": (84, 256), "Q3_K": (110, 256), "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256),
          "IQ4_XS": (136, 256), "IQ4_NL": (18, 32), "Q4_0": (18, 32), "Q5_0": (22, 32), "Q5_1": (24, 32),
          "Q8_0": (34, 32)}


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, meta: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, initializer_range=0.02)
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    return LlamaForCausalLM(cfg).eval()


# ----------------------------------------------------------------------------- the rules (no library needed)

def test_shape_fallback_follows_llama_cpp():
    assert [fallback(t, 576) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL"]
    assert [fallback(t, 1536) for t in ("Q2_K", "Q4_K", "Q6_K")] == ["Q2_K", "Q4_K", "Q6_K"]  # 1536 = 6 x 256
    assert fallback("Q4_K", 80) == "F16" and fallback("Q4_0", 80) == "F16"  # not even a multiple of 32


def test_use_more_bits_layers_for_30_layers():
    # i < 30/8 = 3, i >= 7*30/8 = 26, or (i - 3) % 3 == 2
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_smollm2_q4_k_m_types():
    """SmolLM2-135M's shapes (hidden 576, ffn 1536, 30 layers, 9 heads / 3 KV heads): only down_proj can
    hold a 256-block type. Q4_K_M gives attn_v and ffn_down Q6_K in the use_more_bits layers."""
    model = _llama(576, 1536, 30, 9, 3, meta=True)
    types = {n: t for n, (_, t) in tensor_types(model, "q4_k_m", pure=False).items()}
    more = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    for i in range(30):
        p = f"model.layers.{i}."
        assert types[p + "mlp.down_proj"] == ("Q6_K" if i in more else "Q4_K")
        assert types[p + "self_attn.v_proj"] == ("Q8_0" if i in more else "Q5_0")  # Q6_K / Q4_K fell back
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert types[p + n] == "Q5_0"
    pure = {t for _, t in tensor_types(model, "q4_k_m", pure=True).values()}
    assert pure == {"Q4_K", "Q5_0"}  # --pure: no Q6_K anywhere
    q2 = {n: t for n, (_, t) in tensor_types(model, "q2_k", pure=False).items()}
    # Q2_K: attn_v Q3_K (n_gqa 3 < 4), ffn_down Q3_K, attn_output Q3_K; the 576-long ones fall back to Q4_0
    assert q2["model.layers.7.mlp.down_proj"] == "Q3_K" and q2["model.layers.7.self_attn.v_proj"] == "Q4_0"
    assert q2["model.layers.7.self_attn.q_proj"] == "Q4_0"
    q3 = {n: t for n, (_, t) in tensor_types(model, "q3_k_m", pure=False).items()}
    # Q3_K_M: ffn_down Q5_K in layers < 30/16 = 1, else Q4_K
    assert q3["model.layers.0.mlp.down_proj"] == "Q5_K" and q3["model.layers.1.mlp.down_proj"] == "Q4_K"


def test_aliases_options_and_keys():
    assert FORMATS.get("gguf:q4_k").name == "gguf:q4_k_m"  # llama-quantize reads Q4_K as Q4_K_M
    a, b = FORMATS.get("gguf:q4_k_m").spec(torch.float32), FORMATS.get("gguf:q4_k_m:pure").spec(torch.float32)
    assert a["options"]["pure"] is False and b["options"]["pure"] is True and a != b
    assert a["options"]["source"] == "llama-cpp-python==0.3.36"
    with pytest.raises(QevalError) as e:
        FORMATS.get("gguf:q6_k:g32")
    assert "pure" in str(e.value) and "\n" not in str(e.value)


def test_missing_library_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("QEVAL_GGML_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(QevalError) as e:
        FORMATS.get("gguf:q6_k").require("cpu")
    assert "qeval setup --backend gguf-k" in str(e.value) and "\n" not in str(e.value)
    FORMATS.get("gguf:q4_0").require("cpu")  # the legacy types need only the gguf package


# ----------------------------------------------------------------------------- llama.cpp's quantizer

@needs_ggml
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_ggml_legacy_types_equal_gguf_python_byte_for_byte(qtype):
    """The ctypes call is right: for the types gguf can also quantize, the bytes are identical."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    w = np.random.default_rng(1).standard_normal((24, 320)).astype(np.float32) * 0.03
    ours = ggml_lib.quantize(w, qtype)
    theirs = quantize(w, GGMLQuantizationType[qtype])
    assert ours.tobytes() == theirs.tobytes()


def _naive(w: np.ndarray, group: int, bits: int, symmetric: bool) -> np.ndarray:
    """Round to nearest on a uniform grid per group: min/max (asymmetric) or absmax (symmetric)."""
    x = w.reshape(-1, group)
    if symmetric:
        s = np.abs(x).max(1, keepdims=True) / (2 ** (bits - 1) - 1)
        return (np.round(x / s) * s).reshape(w.shape)
    lo, hi = x.min(1, keepdims=True), x.max(1, keepdims=True)
    s = (hi - lo) / (2 ** bits - 1)
    return (np.round((x - lo) / s) * s + lo).reshape(w.shape)


# type -> (sub-block, bits, symmetric) of the naive quantizer it must beat
NAIVE = {"Q2_K": (16, 2, False), "Q3_K": (16, 3, True), "Q4_K": (32, 4, False), "Q5_K": (32, 5, False),
         "Q6_K": (16, 6, True), "IQ4_XS": (32, 4, True), "IQ4_NL": (32, 4, True)}


@needs_ggml
@pytest.mark.parametrize("qtype", sorted(NAIVE))
def test_k_quant_roundtrip_bytes_grid_and_error(qtype):
    from qeval.quant.backends.gguf_k import roundtrip

    w = torch.from_numpy(np.random.default_rng(2).standard_normal((32, 512)).astype(np.float32) * 0.02)
    back, nbytes = roundtrip(w, qtype)
    per_block, block = LAYOUT[qtype]
    assert nbytes == w.numel() // block * per_block
    group, bits, symmetric = NAIVE[qtype]
    x = back.numpy()
    assert max(len(np.unique(r)) for r in x.reshape(-1, group)) <= 2 ** bits  # on a 2^bits grid per sub-block
    rms = float(np.sqrt(((x - w.numpy()) ** 2).mean()))
    naive = float(np.sqrt(((_naive(w.numpy(), group, bits, symmetric) - w.numpy()) ** 2).mean()))
    assert 0 < rms <= naive  # llama.cpp's search beats plain rounding with the same bits and group
    again, _ = roundtrip(back, qtype)
    assert float(np.sqrt(((again.numpy() - x) ** 2).mean())) < 0.25 * rms  # (nearly) a fixed point


@needs_ggml
def test_widths_multiple_of_256_hold_k_quants():
    """hidden 256, ffn 512, 4 layers: every tensor keeps its K type. Q4_K_M's Q6_K layers for attn_v and
    ffn_down are use_more_bits(i, 4): i < 4/8 = 0 (none), i >= 7*4/8 = 3, or (i - 0) % 3 == 2: {2, 3}."""
    fmt = FORMATS.get("gguf:q4_k_m")
    model = _llama(256, 512, 4, 4, 2)
    before = {n: m.weight.detach().clone() for n, m in quantizable_linears(model)}
    fmt.after_load(model, "cpu", torch.float32)
    fp = measure_footprint(model, fmt)
    more = {2, 3}
    expected = {}
    for n, m in quantizable_linears(model):
        i = int(n.split(".")[2])
        t = "Q6_K" if n.endswith(("v_proj", "down_proj")) and i in more else "Q4_K"
        expected[t] = expected.get(t, 0) + m.weight.numel()
        from qeval.quant.backends.gguf_k import roundtrip

        assert torch.equal(m.weight, roundtrip(before[n], t)[0])  # the tensor holds that type's values
    assert fp.packed_types == expected
    packed = sum(n // LAYOUT[t][1] * LAYOUT[t][0] for t, n in expected.items())
    assert fp.packed_bytes == packed
    assert fp.theory_bytes - fp.unquantized_bytes == packed  # theory tensor by tensor = the packed layout
    assert fp.quantized_weight_bytes == 4 * fp.quantized_params  # float32 in memory: simulated


@needs_ggml
def test_tiny_model_widths_fall_back_to_legacy_types(resolved):
    """The shared tiny model (rows of 64 and 128): every K type falls back; the weights are exactly
    gguf's own Python Q5_0 / Q8_0 round trip of the float weights."""
    from qeval.models.load import load_model
    from qeval.quant.backends.gguf import roundtrip as gguf_python_roundtrip

    base = load_model(resolved, FORMATS.get("none"), "cpu").model
    lm = load_model(resolved, FORMATS.get("gguf:q4_k_m"), "cpu")
    n = lm.footprint.quantized_params
    # 2 layers: use_more_bits(i, 2) holds for i >= 7*2/8 = 1 only, so layer 1's attn_v and ffn_down want Q6_K
    more = ("layers.1.self_attn.v_proj", "layers.1.mlp.down_proj")
    v_down = sum(m.weight.numel() for name, m in quantizable_linears(lm.model) if name.endswith(more))
    assert lm.footprint.packed_types == {"Q5_0": n - v_down, "Q8_0": v_down}
    ref = dict(quantizable_linears(base))
    for name, m in quantizable_linears(lm.model):
        t = "q8_0" if name.endswith(more) else "q5_0"
        assert torch.equal(m.weight, gguf_python_roundtrip(ref[name].weight, t)[0]), name


@pytest.mark.slow
@needs_ggml
def test_smollm2_q4_k_m_census_bytes_and_theory():
    """The embedded SmolLM2-135M: the per-tensor census of Q4_K_M and its bytes, written out from the
    shapes (per layer: q, o 576x576; k, v 192x576; gate, up 1536x576; down 576x1536; 30 layers)."""
    from qeval.models.load import load_model, resolve_model

    lm = load_model(resolve_model("smollm2-135m"), FORMATS.get("gguf:q4_k_m"), "cpu")
    fp = lm.footprint
    q, kv, ffn = 576 * 576, 192 * 576, 1536 * 576
    more = 14  # use_more_bits layers of 30 (test_use_more_bits_layers_for_30_layers)
    expected = {"Q4_K": (30 - more) * ffn, "Q6_K": more * ffn, "Q8_0": more * kv,
                "Q5_0": 30 * (2 * q + kv + 2 * ffn) + (30 - more) * kv}
    assert fp.packed_types == expected
    packed = sum(n // LAYOUT[t][1] * LAYOUT[t][0] for t, n in expected.items())
    assert fp.packed_bytes == packed and fp.theory_bytes - fp.unquantized_bytes == packed
    assert packed * 8 / fp.quantized_params == pytest.approx(5.534, abs=0.001)  # not Q4_K's 4.5: mostly Q5_0


@needs_ggml
def test_run_and_report_show_the_type_census(tiny_model_dir, tmp_path, capsys):
    """End to end on the tiny model: the record carries the per-tensor types, and the report's format
    landscape names them (rows of 64/128: Q6_K falls back to Q8_0 everywhere)."""
    rec, md, _ = run_kl_and_report(tiny_model_dir, "none,gguf:q6_k", tmp_path, capsys)
    n = rec["gguf:q6_k"].footprint.quantized_params
    assert rec["gguf:q6_k"].footprint.packed_types == {"Q8_0": n}
    assert rec["gguf:q6_k"].footprint.packed_bytes == n // 32 * 34
    assert "gguf:q6_k: Q8_0 100.0%" in md


def test_setup_command_reuses_a_built_library(monkeypatch, tmp_path, capsys):
    from qeval.cli import main

    lib = tmp_path / "libggml-base.so"
    lib.write_bytes(b"")
    monkeypatch.setenv("QEVAL_GGML_LIB", str(lib))
    assert main(["setup", "--backend", "gguf-k"]) == 0
    assert str(lib) in capsys.readouterr().out
    monkeypatch.setenv("QEVAL_GGML_LIB", str(tmp_path / "gone.so"))
    assert main(["setup", "--backend", "gguf-k"]) == 2
    assert "gone.so" in capsys.readouterr().err


def test_build_without_cmake_is_one_line(monkeypatch):
    import shutil

    monkeypatch.delenv("QEVAL_GGML_LIB", raising=False)  # the per-test cache holds no build
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "cmake" else real(name))
    with pytest.raises(QevalError) as e:
        ggml_lib.build(log=lambda s: None)
    assert "cmake" in str(e.value) and "apt-get install cmake" in str(e.value) and "\n" not in str(e.value)
