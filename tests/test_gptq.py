"""GPTQ backend (qeval.quant.backends.gptq): unpacking against hand-packed tensors, the checkpoint
applied to the tiny model (weights and packed bytes), calibration in the key, the isolated-env
requirement. The real quantization (gptqmodel in its own venv) is the slow test at the end."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from qeval.core.errors import QevalError
from qeval.models.load import load_model
from qeval.quant.backend import marked
from qeval.quant.formats import FORMATS, quantizable_linears
from qeval.quant.backends import gptq as gq


def _pack_rows(codes: list[list[int]], bits: int) -> torch.Tensor:
    """Hand packing, word by word with Python ints: codes [in][out] -> int32 [in*bits/32][out]."""
    per = 32 // bits
    rows, cols = len(codes), len(codes[0])
    out = []
    for r in range(rows // per):
        row = []
        for c in range(cols):
            word = 0
            for j in range(per):
                word |= codes[r * per + j][c] << (bits * j)
            row.append(word - (1 << 32) if word >= 1 << 31 else word)  # as a signed int32
        out.append(row)
    return torch.tensor(out, dtype=torch.int32)


def _pack_cols(codes: list[list[int]], bits: int) -> torch.Tensor:
    t = _pack_rows([list(col) for col in zip(*codes)], bits)  # pack the transpose along rows
    return t.t().contiguous()


def _hand_layer(out_f: int, in_f: int, bits: int, group: int, seed: int = 0, shuffled: bool = False):
    g = torch.Generator().manual_seed(seed)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (in_f, out_f), generator=g).tolist()
    groups = in_f // group
    z = torch.randint(1, top + 1, (groups, out_f), generator=g).tolist()  # v1 stores z - 1 >= 0
    scales = (torch.rand(groups, out_f, generator=g) * 0.02 + 0.001).half()
    g_idx = [i // group for i in range(in_f)]
    if shuffled:  # desc_act checkpoints: any column may belong to any group
        g_idx = torch.randint(0, groups, (in_f,), generator=g).tolist()
    # expected weight, element by element
    w = [[float(scales[g_idx[i], o]) * (q[i][o] - z[g_idx[i]][o]) for i in range(in_f)] for o in range(out_f)]
    tensors = {"qweight": _pack_rows(q, bits), "qzeros": _pack_cols([[v - 1 for v in row] for row in z], bits),
               "scales": scales, "g_idx": torch.tensor(g_idx, dtype=torch.int32)}
    return tensors, torch.tensor(w)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shuffled", [False, True])
def test_dequantize_matches_hand_packed_layer(bits, shuffled):
    t, expected = _hand_layer(out_f=16, in_f=64, bits=bits, group=16, seed=bits, shuffled=shuffled)
    got = gq.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, zero_offset=1)
    assert got.shape == expected.shape == (16, 64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # gptq_v2 stores the zero itself: the same tensors read as v2 shift every weight by one step
    v2 = gq.dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, zero_offset=0)
    scale_per_weight = t["scales"].float()[t["g_idx"].long()].t()
    torch.testing.assert_close(v2 - got, scale_per_weight, rtol=0, atol=1e-6)


def test_unpack_high_bit_codes_are_unsigned():
    # a word whose top code is 15 is negative as int32: unpacking must not sign-extend it
    word = torch.tensor([[-(1 << 28)]], dtype=torch.int32)  # 0xF0000000
    assert gq.unpack_int32(word, 4, 0).flatten().tolist() == [0] * 7 + [15]
    assert gq.unpack_int32(word, 4, 1).flatten().tolist() == [0] * 7 + [15]


def _write_checkpoint(model, folder: Path, bits: int, group: int) -> dict[str, torch.Tensor]:
    """A GPTQ-layout checkpoint of the model by round-to-nearest (symmetric, zero 2^(b-1)), packed
    by hand; returns the weights it encodes, per layer."""
    from safetensors.torch import save_file

    tensors, expected = {}, {}
    mid = 1 << (bits - 1)
    for name, m in quantizable_linears(model):
        w = m.weight.detach().float()  # [out, in]
        out_f, in_f = w.shape
        wg = w.view(out_f, in_f // group, group)
        scale = (wg.abs().amax(-1) / (mid - 1)).clamp(min=1e-8).half()  # [out, groups]
        q = (wg / scale.float().unsqueeze(-1)).round().clamp(-mid, mid - 1) + mid
        codes = q.reshape(out_f, in_f).t().long().tolist()  # [in][out]
        tensors[f"model.{name}.qweight"] = _pack_rows(codes, bits)
        tensors[f"model.{name}.qzeros"] = _pack_cols([[mid - 1] * out_f for _ in range(in_f // group)], bits)
        tensors[f"model.{name}.scales"] = scale.t().contiguous()
        tensors[f"model.{name}.g_idx"] = torch.arange(in_f, dtype=torch.int32) // group
        expected[name] = ((q - mid) * scale.float().unsqueeze(-1)).reshape(out_f, in_f)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "quantize_config.json").write_text(json.dumps({"bits": bits, "group_size": group, "sym": True,
                                                             "desc_act": False, "checkpoint_format": "gptq"}))
    return expected


def test_checkpoint_applied_to_tiny_model(resolved, tmp_path, monkeypatch):
    float_model = load_model(resolved, FORMATS.get("none"), "cpu").model
    expected = _write_checkpoint(float_model, tmp_path / "ckpt", bits=4, group=16)
    seen = {}

    def fake_ensure(model_dir, tok, options, cal, progress=None):
        seen.update(model_dir=Path(model_dir), options=options, cal=cal)
        return tmp_path / "ckpt"

    monkeypatch.setattr(gq, "ensure_checkpoint", fake_ensure)
    fmt = FORMATS.get("gptq:w4:g16")
    lm = load_model(resolved, fmt, "cpu")
    assert seen["model_dir"] == Path(resolved.path) and seen["options"]["group_size"] == 16
    n_weights = 0
    for name, m in quantizable_linears(lm.model):
        torch.testing.assert_close(m.weight, expected[name], rtol=0, atol=1e-6)
        n_weights += m.weight.numel()
        g_idx_bytes = 4 * m.in_features
        # the packed layer: codes (4 bits), fp16 scales and 4-bit zeros per group of 16, g_idx
        assert marked(m).packed_bytes == n_codes_bytes(m, 4, 16) + g_idx_bytes
    fp = lm.footprint
    assert fp.quantized_params == n_weights
    # packed bytes minus g_idx (left out of the theory) is exactly the theory's quantized part
    g_idx_total = sum(4 * m.in_features for _, m in quantizable_linears(lm.model))
    assert fp.packed_bytes - g_idx_total == round(n_weights * (4 + (16 + 4) / 16) / 8)
    assert fmt.kernel == "simulated" and fmt.backend == "gptq"


def n_codes_bytes(m, bits, group):
    return m.in_features * m.out_features * bits // 8 + (m.in_features // group) * m.out_features * (2 + bits / 8)


def test_names_options_and_bad_options():
    assert FORMATS.get("gptq:w4").name == "gptq:w4:g128"  # the default group is explicit
    f = FORMATS.get("gptq:w4:g64:act:asym")
    assert f.name == "gptq:w4:g64:act:asym" and f.divides == 64
    o = dict(f.options)
    assert (o["bits"], o["group_size"], o["desc_act"], o["sym"]) == (4, 64, True, False)
    assert f.bits_per_weight(576) == pytest.approx(4 + 20 / 64)
    with pytest.raises(QevalError, match="act"):
        FORMATS.get("gptq:w4:g64:desc")
    with pytest.raises(QevalError, match="one of w2, w4, w8"):
        FORMATS.get("gptq:w5")


def test_group_size_checked_against_the_model(tiny_model_dir):
    from qeval.models.load import linear_in_features

    problems = FORMATS.get("gptq:w4:g128").check_shapes(linear_in_features(tiny_model_dir), "tiny")
    assert problems and "128" in str(problems[0])
    assert FORMATS.get("gptq:w4:g16").check_shapes(linear_in_features(tiny_model_dir), "tiny") == []


def test_calibration_hash_is_in_the_format_spec_and_the_cell_key(tmp_path, resolved):
    from qeval.eval.evaluate import EvalSpec
    from qeval.run.runner import Arm, make_cells
    from qeval.eval.suites import load_suite

    suite = load_suite("default")

    def key(fmt_name, cal=None):
        return make_cells(resolved, Arm(fmt_name, fmt_name), suite, EvalSpec(), "cpu", calibration=cal)[0].key

    default_key, default_spec = key("gptq:w4:g16"), FORMATS.get("gptq:w4:g16").spec(torch.float32)
    texts = tmp_path / "cal.jsonl"
    texts.write_text("".join(json.dumps({"text": f"calibration row {i} about rivers and towns."}) + "\n"
                             for i in range(20)))
    cal4 = gq.CalibrationSpec(data=str(texts), samples=4, seq_len=16)
    spec = gq.calibrated("gptq:w4:g16", cal4).spec(torch.float32)
    assert spec["options"]["calibration"]["hash"] != default_spec["options"]["calibration"]["hash"]
    k1 = key("gptq:w4:g16", cal4)
    cal8 = gq.CalibrationSpec(data=str(texts), samples=8, seq_len=16)
    k2 = key("gptq:w4:g16", cal8)
    texts.write_text(texts.read_text() + json.dumps({"text": "one more row"}) + "\n")
    k3 = key("gptq:w4:g16", cal8)  # the same spec, other content: hashed again, so another key
    assert len({default_key, k1, k2, k3}) == 4  # data, sample count and content each move the key
    assert key("gptq:w4:g16", gq.CalibrationSpec()) == default_key  # and the same calibration gives the same key back
    assert FORMATS.get("gptq:w4:g16").spec(torch.float32) == default_spec  # a name alone: the default set, always


def test_calibration_blocks_come_from_the_plan_data(tmp_path, resolved):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolved.path)
    texts = tmp_path / "cal.jsonl"
    texts.write_text("".join(json.dumps({"text": f"row {i} " * 20}) + "\n" for i in range(10)))
    blocks = gq.calibration_blocks(gq.CalibrationSpec(data=str(texts), samples=3, seq_len=8), tok)
    assert len(blocks) == 3 and all(len(b) == 8 for b in blocks)
    first = tok(f"row 0 " * 20, add_special_tokens=False).input_ids
    assert blocks[0] == first[:8]


def test_isolated_env_missing_is_one_line_with_the_command(monkeypatch, tmp_path):
    monkeypatch.setenv(gq.PYTHON_ENV, str(tmp_path / "nowhere" / "bin" / "python"))
    with pytest.raises(QevalError) as e:
        FORMATS.get("gptq:w4:g64").require("cpu")
    msg = str(e.value)
    assert "\n" not in msg and "qeval setup --backend gptq" in msg and "nowhere" in msg
    # a venv without gptqmodel says so too
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")
    (tmp_path / "venv" / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    monkeypatch.setenv(gq.PYTHON_ENV, str(tmp_path / "venv" / "bin" / "python"))
    with pytest.raises(QevalError, match="gptqmodel"):
        FORMATS.get("gptq:w4:g64").require("cpu")


# ----------------------------------------------------------------------------- the real thing

KERNEL_WEIGHTS = """
import json, sys, torch
from gptqmodel import GPTQModel
m = GPTQModel.load(sys.argv[1], device="cpu", dtype=torch.float32)
out = {}
for n, x in m.model.named_modules():
    if hasattr(x, "qweight"):
        with torch.no_grad():
            out[n] = x(torch.eye(x.in_features, dtype=torch.float32)).t().tolist()
json.dump(out, open(sys.argv[2], "w"))
"""

def _real_env() -> Path | None:
    p = Path(os.environ.get(gq.PYTHON_ENV) or Path.home() / ".cache" / "qeval" / "venvs" / "gptq" / "bin" / "python")
    return p if p.exists() else None


@pytest.mark.slow
@pytest.mark.skipif(_real_env() is None, reason="no isolated GPTQ env (create it with: qeval setup --backend gptq)")
def test_real_gptqmodel_quantizes_tiny_model_and_caches(resolved, monkeypatch, tmp_path):
    """gptqmodel in its own venv quantizes the tiny model; qeval reads it back: every weight on its
    group's 16-level grid, close to the float weight, and a second load reuses the checkpoint."""
    monkeypatch.setenv(gq.PYTHON_ENV, str(_real_env()))
    monkeypatch.setenv("QEVAL_CACHE", str(tmp_path / "cache"))
    fmt = gq.calibrated("gptq:w4:g32", gq.CalibrationSpec(samples=8, seq_len=64)).require("cpu")
    base = load_model(resolved, FORMATS.get("none"), "cpu").model
    lm = load_model(resolved, fmt, "cpu")
    ckpts = list((tmp_path / "cache" / "gptq").glob("*/qeval-gptq.json"))
    assert len(ckpts) == 1
    meta = json.loads(ckpts[0].read_text())
    assert meta["samples_used"] == 8 and meta["env_versions"]["gptqmodel"] == gq.GPTQ_VERSION
    floats = dict(quantizable_linears(base))
    for name, m in quantizable_linears(lm.model):
        w, w0 = m.weight.detach(), floats[name].weight.detach()
        groups = w.reshape(w.shape[0], -1, 32).reshape(-1, 32)  # 32 weights of a row's group: <= 16 levels
        assert max(len(torch.unique(g)) for g in groups) <= 16 < len(torch.unique(w0.reshape(-1, 32)[0])) + 16
        # GPTQ's error feedback moves weights by more than rounding would, but not by much
        assert (w - w0).abs().mean() < 0.5 * w0.abs().mean()
    assert lm.footprint.packed_bytes > 0
    # independent check: gptqmodel's own CPU kernel, in the isolated env, applied to an identity
    # matrix gives its weight; it computes bf16(bf16(scale) * (q - zero)), so our unpacking with
    # the scales rounded the same way must give exactly those numbers (zero off by one: far off)
    script = tmp_path / "kernel_weights.py"
    script.write_text(KERNEL_WEIGHTS)
    out = tmp_path / "kernel.json"
    subprocess.run([str(_real_env()), str(script), str(ckpts[0].parent), str(out)], check=True, capture_output=True,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"CUDA_VISIBLE_DEVICES": ""})
    tensors, _ = gq.read_checkpoint(ckpts[0].parent)
    kernel = json.loads(out.read_text())
    assert len(kernel) == len(quantizable_linears(lm.model))
    for name, w in kernel.items():
        w = torch.tensor(w)
        args = [tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")]
        args[2] = args[2].bfloat16()
        assert torch.equal(gq.dequantize(*args, bits=4).bfloat16().float(), w), name
        off = gq.dequantize(*args, bits=4, zero_offset=0).bfloat16().float()
        assert (off - w).abs().max() > 10 * (gq.dequantize(*args, bits=4) - w).abs().max()
    t0 = ckpts[0].stat().st_mtime
    lm2 = load_model(resolved, fmt, "cpu")  # reused: no second quantization
    assert ckpts[0].stat().st_mtime == t0
    for (_, a), (_, b) in zip(quantizable_linears(lm.model), quantizable_linears(lm2.model)):
        assert torch.equal(a.weight, b.weight)


def test_a_cell_carries_its_calibration_to_another_process(tmp_path, resolved):
    """Cells travel to Ray workers as plain data: the plan's calibration set is a field of the
    cell, so a worker computes what the key says (not the default calibration), and nothing
    process-wide is set on either side."""
    import pickle

    from qeval.eval.evaluate import EvalSpec
    from qeval.run.runner import Arm, make_cells
    from qeval.eval.suites import load_suite

    texts = tmp_path / "cal.jsonl"
    texts.write_text("".join(json.dumps({"text": f"row {i} of calibration text"}) + "\n" for i in range(20)))
    cal = gq.CalibrationSpec(data=str(texts), samples=4, seq_len=16)
    cell = make_cells(resolved, Arm("g", "gptq:w4:g16"), load_suite("default"), EvalSpec(), "cpu", calibration=cal)[0]
    assert cell.calibration == cal and type(cell).__reduce__ is object.__reduce__  # plain pickling
    back = pickle.loads(pickle.dumps(cell))
    assert back == cell
    assert back.fmt.spec(torch.float32) == cell.key_material["format"]
    assert back.fmt.spec(torch.float32)["options"]["calibration"]["samples"] == 4
    # a format without calibration carries none
    plain = make_cells(resolved, Arm("n", "bnb-nf4"), load_suite("default"), EvalSpec(), "cpu", calibration=cal)[0]
    assert plain.calibration is None


FAKE_GPTQMODEL = '''
import json, os
class QuantizeConfig:
    def __init__(self, **kw):
        self.kw = kw
class _Model:
    def __init__(self, path, qcfg):
        self.path, self.qcfg = path, qcfg
    def quantize(self, calibration, batch_size=1):
        self.calibration = calibration
    def save(self, out):
        if os.environ.get("FAKE_GPTQ_FAIL"):
            raise RuntimeError("out of patience")
        os.makedirs(out)
        json.dump({"model": self.path, "qcfg": self.qcfg.kw, "ids": [c["input_ids"] for c in self.calibration]},
                  open(os.path.join(out, "seen.json"), "w"))
        with open(os.environ["FAKE_GPTQ_COUNT"], "a") as f:
            f.write("x")
class GPTQModel:
    @staticmethod
    def load(path, qcfg, device="cpu"):
        return _Model(path, qcfg)
'''


def _fake_env(root: Path) -> Path:
    """A stand-in isolated env: a `python` that runs this interpreter with a fake gptqmodel that
    records what the job handed it (the child protocol, without gptqmodel)."""
    import sys

    sp = root / "lib" / "python3.11" / "site-packages"
    (sp / "gptqmodel").mkdir(parents=True)
    (sp / "gptqmodel" / "__init__.py").write_text(FAKE_GPTQMODEL)
    for dist in ("gptqmodel-7.6.0", "torch-2.13.0", "transformers-5.24.0"):
        (sp / f"{dist}.dist-info").mkdir()
        name, version = dist.rsplit("-", 1)
        (sp / f"{dist}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (root / "bin").mkdir()
    py = root / "bin" / "python"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={sp} exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    return py


def test_child_job_protocol_cache_and_failure(resolved, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from qeval.core.errors import ChildError

    monkeypatch.setenv(gq.PYTHON_ENV, str(_fake_env(tmp_path / "venv")))
    monkeypatch.setenv("FAKE_GPTQ_COUNT", str(tmp_path / "count"))
    tok = AutoTokenizer.from_pretrained(resolved.path)
    cal = gq.CalibrationSpec(samples=3, seq_len=16)
    opts = {"bits": 4, "group_size": 16, "desc_act": False, "sym": True, "damp_percent": 0.01}
    folder = gq.ensure_checkpoint(Path(resolved.path), tok, opts, cal, progress=lambda s: None)
    seen = json.loads((folder / "seen.json").read_text())
    assert seen["model"] == str(resolved.path) and seen["ids"] == gq.calibration_blocks(cal, tok)
    assert seen["qcfg"] == {"bits": 4, "group_size": 16, "desc_act": False, "sym": True, "damp_percent": 0.01}
    meta = json.loads((folder / "qeval-gptq.json").read_text())
    assert meta["env_versions"] == {"gptqmodel": "7.6.0", "torch": "2.13.0", "transformers": "5.24.0"}
    assert meta["calibration"] == cal.identity() and meta["samples_used"] == 3
    assert gq.ensure_checkpoint(Path(resolved.path), tok, opts, cal, progress=lambda s: None) == folder
    assert (tmp_path / "count").read_text() == "x"  # the second call reused the checkpoint
    other = gq.ensure_checkpoint(Path(resolved.path), tok, {**opts, "group_size": 32}, cal, progress=lambda s: None)
    assert other != folder and (tmp_path / "count").read_text() == "xx"
    monkeypatch.setenv("FAKE_GPTQ_FAIL", "1")
    with pytest.raises(ChildError, match="out of patience"):
        gq.ensure_checkpoint(Path(resolved.path), tok, {**opts, "bits": 8}, cal, progress=lambda s: None)
    assert not [p for p in (folder.parent).iterdir() if p.name.startswith(".") and p.is_dir()]  # no debris
