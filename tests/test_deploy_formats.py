"""The formats people deploy (issue 22 item 2) on CPU: FP8 (torchao:fp8-wo, quanto:float8), NVFP4
weight-only (torchao:nvfp4-wo), MXFP4 simulated through gguf-py (gguf:mxfp4), AWQ (awq:w4, gptqmodel
in the GPTQ venv); the CUDA-only ones (torchao:fp8-dyn, mxfp8, mxfp4) refuse in one line here and
are measured by tests/test_gpu_formats.py. Bytes against each layout counted independently, numerics
against an independent implementation, and `optional_formats` skipping what cannot run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qeval.core.errors import QevalError
from qeval.models.load import load_model
from qeval.quant.formats import FORMATS, quantizable_linears

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)  # the fp4 magnitudes (OCP MX spec)


def _shapes(lm):
    return [(m.out_features, m.in_features) for n, m in lm.model.named_modules() if n.endswith(LINEAR)]


def _layout_bytes(name: str, shapes) -> int:
    """Codes + scales of each format's layout, counted from the formats' definitions."""
    if name in ("torchao:fp8-wo", "quanto:float8"):
        return sum(o * i + 4 * o for o, i in shapes)  # one e4m3 byte a weight, fp32 scale per row
    if name == "torchao:nvfp4-wo":  # two e2m1 codes a byte; e4m3 scale per 16, blocked to 128 rows x 4 blocks
        return sum(o * i // 2 + math.ceil(o / 128) * 128 * math.ceil(i / 16 / 4) * 4 + 4 for o, i in shapes)
    raise KeyError(name)


def test_listing_has_fp8_awq_and_mxfp4(capsys):
    from qeval.cli import main

    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in ("torchao:fp8-wo", "torchao:fp8-dyn", "quanto:float8", "torchao:mxfp8", "torchao:mxfp4",
                 "torchao:nvfp4-wo", "gguf:mxfp4", "awq:w4"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name
    assert FORMATS.get("awq:w4").name == "awq:w4:g128"  # AWQ's usual group is the default


@pytest.mark.parametrize("name", ["torchao:fp8-wo", "quanto:float8", "torchao:nvfp4-wo"])
def test_cpu_float_formats_bytes_and_numerics(resolved, name):
    fmt = FORMATS.get(name)
    ref = load_model(resolved, FORMATS.get("none"), "cpu")
    floats = {n: m.weight.detach().clone() for n, m in ref.model.named_modules() if n.endswith(LINEAR)}
    lm = load_model(resolved, fmt, "cpu")
    fp, shapes = lm.footprint, _shapes(lm)
    n = sum(o * i for o, i in shapes)
    assert fp.quantized_params == n
    assert fp.quantized_weight_bytes + fp.quant_state_bytes == _layout_bytes(name, shapes)
    theory = fp.theory_bytes - fp.unquantized_bytes
    assert theory == pytest.approx(sum(o * i * fmt.bits_per_weight(i) / 8 for o, i in shapes), abs=len(shapes))
    for lname, m in lm.model.named_modules():
        if not lname.endswith(LINEAR):
            continue
        w, w0 = m.weight.dequantize().float(), floats[lname].float()
        if name == "torchao:nvfp4-wo":  # 16-weight blocks hold at most 15 distinct values (e2m1 has +-0)
            assert max(len(torch.unique(b)) for b in w.reshape(-1, 16)[:50]) <= 15
            assert (w - w0).abs().mean() < 0.2 * w0.abs().mean()
            continue
        # fp8: an independent per-row e4m3 quantizer (scale = row amax / 448, round-to-nearest cast)
        scale = w0.abs().amax(dim=1, keepdim=True) / 448
        expect = (w0 / scale).to(torch.float8_e4m3fn).float() * scale
        assert torch.allclose(w, expect, rtol=0, atol=1e-6 * w0.abs().max().item()), lname
    inner = {getattr(m.weight, a).dtype for _, m in quantizable_linears(lm.model) for a in m.weight.__tensor_flatten__()[0]}
    assert inner == ({torch.uint8, torch.float8_e4m3fn, torch.float32} if name == "torchao:nvfp4-wo"
                     else {torch.float8_e4m3fn, torch.float32})  # codes (+ e4m3 block scales) + fp32 scales


def _mxfp4_reference(w: np.ndarray) -> np.ndarray:
    """OCP MXFP4 as llama.cpp quantizes it: per 32 weights a power-of-two scale 2^(floor(log2 amax) - 2),
    each weight the nearest e2m1 value times the scale."""
    blocks = w.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, 2.0 ** (np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2), 0).astype(np.float32)
    grid = np.concatenate([E2M1, -E2M1])
    idx = np.abs(blocks[:, :, None] - scale[:, :, None] * grid[None, None, :]).argmin(axis=-1)
    return (grid[idx] * scale).reshape(w.shape)


def test_gguf_mxfp4_simulation(resolved):
    ref = load_model(resolved, FORMATS.get("none"), "cpu")
    floats = {n: m.weight.detach().float().numpy().copy() for n, m in ref.model.named_modules() if n.endswith(LINEAR)}
    fmt = FORMATS.get("gguf:mxfp4")
    lm = load_model(resolved, fmt, "cpu")
    fp, n = lm.footprint, sum(o * i for o, i in _shapes(lm))
    assert fp.packed_bytes == n // 32 * 17  # block_mxfp4: one e8m0 byte + 16 bytes of nibbles (ggml-common.h)
    assert fp.packed_bytes * 8 / n == pytest.approx(fmt.bits_per_weight(64)) and fmt.kernel == "simulated"
    for lname, m in lm.model.named_modules():
        if lname.endswith(LINEAR):
            np.testing.assert_array_equal(m.weight.detach().numpy(), _mxfp4_reference(floats[lname]))


@pytest.mark.parametrize("name", ["torchao:fp8-dyn", "torchao:mxfp8", "torchao:mxfp4"])
def test_cuda_only_formats_refuse_on_cpu_in_one_line(tmp_path, tiny_model_dir, capsys, name):
    from qeval.cli import main

    with pytest.raises(QevalError) as e:
        FORMATS.get(name).require("cpu")
    assert "CUDA" in str(e.value) and "\n" not in str(e.value)
    store = tmp_path / "store.sqlite"
    code = main(["run", "--model", str(tiny_model_dir), "--formats", f"none,{name}", "--suite", "smoke",
                 "--store", str(store), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and name in err and "Traceback" not in err and not store.exists()
    assert len([x for x in err.splitlines() if name in x]) == 1


def test_optional_formats_skip_what_cannot_run_with_the_reason(tiny_model_dir, capsys):
    from qeval.run.plan import plan_from, validate

    r = validate(plan_from({"models": [str(tiny_model_dir)], "formats": ["none"], "suite": "smoke", "device": "cpu",
                   "optional_formats": ["torchao:fp8-dyn", "quanto:float8"]}))
    assert [a.name for a in r.arms] == ["none", "quanto:float8"]
    err = capsys.readouterr().err
    assert "skipped optional format torchao:fp8-dyn" in err and "CUDA" in err
    with pytest.raises(QevalError) as e:  # a misspelt optional format is still an error
        validate(plan_from({"models": [str(tiny_model_dir)], "formats": ["none"], "suite": "smoke", "device": "cpu",
                            "optional_formats": ["torchao:fp8-dynn"]}))
    assert "fp8-dynn" in str(e.value)


# ----------------------------------------------------------------------------- AWQ

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: nibble k of a word holds column AWQ_ORDER[k]


def _awq_pack(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's GEMM packing, written out: 8 columns per int32, nibble k <- column AWQ_ORDER[k]."""
    r, c = codes.shape
    words = torch.zeros(r, c // 8, dtype=torch.int64)
    for k, col in enumerate(AWQ_ORDER):
        words |= codes[:, col::8].to(torch.int64) << (4 * k)
    return words.to(torch.int64).where(words < 2 ** 31, words - 2 ** 32).to(torch.int32)


def test_awq_dequantize_matches_its_packing():
    from qeval.quant.backends.awq import dequantize

    g, n_in, n_out = 16, 64, 24
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (n_in, n_out), generator=gen)
    z = torch.randint(0, 16, (n_in // g, n_out), generator=gen)
    s = torch.rand(n_in // g, n_out, generator=gen).half() + 0.01
    w = dequantize(_awq_pack(q), _awq_pack(z), s, g)
    expect = torch.stack([s.float()[i // g] * (q[i] - z[i // g]).float() for i in range(n_in)]).t()
    assert torch.equal(w, expect)


def test_awq_theory_calibration_and_missing_env(monkeypatch, tmp_path):
    from qeval.quant.backends.gptq import CalibrationSpec, calibrated

    fmt = FORMATS.get("awq:w4:g64")
    assert fmt.bits_per_weight(576) == 4 + 20 / 64  # 4-bit codes + fp16 scale + 4-bit zero per 64
    cal = calibrated("awq:w4:g64", CalibrationSpec(samples=8, seq_len=64))
    assert cal.backend == "awq" and dict(cal.options)["calibration"]["samples"] == 8
    assert dict(cal.options)["method"] == "awq"
    monkeypatch.setenv("QEVAL_GPTQ_PYTHON", str(tmp_path / "absent" / "python"))
    with pytest.raises(QevalError) as e:
        fmt.require("cpu")
    assert "qeval setup --backend gptq" in str(e.value) and "\n" not in str(e.value)


def test_awq_end_to_end_in_the_gptq_venv(resolved, tmp_path):
    """gptqmodel's AWQ in the isolated venv on a tiny model whose widths it accepts (every output a
    multiple of 64): the packed bytes are the GEMM layout's, every quantized weight is replaced, the
    RMSNorm weights AWQ folded its scales into come from the checkpoint, and the model stays close to
    the float one. The default tiny model (k/v outputs of 32) is refused in one line."""
    from conftest import build_tiny_model
    from safetensors.torch import load_file

    from qeval.models.load import resolve_model
    from qeval.quant.backends.gptq import env_problem

    if (problem := env_problem("awq:w4:g64")) is not None:
        pytest.skip(f"the isolated GPTQ/AWQ venv is not built here: {problem}")
    with pytest.raises(QevalError) as e:
        load_model(resolved, FORMATS.get("awq:w4:g64"), "cpu")
    assert "awq:w4:g64" in str(e.value) and "multiple of 64" in str(e.value) and "k_proj (32)" in str(e.value)
    wide = resolve_model(str(build_tiny_model(tmp_path / "wide", hidden_size=128, intermediate_size=256,
                                              num_attention_heads=4, num_key_value_heads=2)))
    lm = load_model(wide, FORMATS.get("awq:w4:g64"), "cpu")
    base = load_model(wide, FORMATS.get("none"), "cpu")
    n = sum(o * i for o, i in _shapes(lm))
    # int32 qweight (8 codes a word) + qzeros + fp16 scales per group of 64
    assert lm.footprint.packed_bytes == sum(o * i // 2 + (i // 64) * (o // 2 + 2 * o) for o, i in _shapes(lm))
    assert lm.footprint.quantized_params == n
    import torch

    from qeval.core import env
    ckpt = next((env.cache_dir() / "gptq").glob("*/quantize_config.json")).parent
    tensors = {}
    for f in ckpt.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    norm = "model.layers.0.input_layernorm.weight"
    got = dict(lm.model.named_parameters())[norm]
    assert torch.equal(got, tensors[norm].to(got.dtype))
    ids = torch.tensor([list(range(3, 67))])
    with torch.no_grad():
        p = torch.log_softmax(base.model(ids).logits.float(), -1)
        q = torch.log_softmax(lm.model(ids).logits.float(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    assert 0 < kl < 0.05, kl