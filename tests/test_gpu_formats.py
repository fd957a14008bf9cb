"""GPU-only and GPU-run formats (marked `gpu`: selected on a CUDA machine by `pytest -m gpu` /
scripts/gpu-check.sh, skipped with a reason elsewhere): torchao's packed int4 for the tinygemm kernel
(`torchao:int4-tinygemm`, and `torchao:int4-hqq` with torchao's HQQ port) and the hqq package's
`hqq:4bit` on CUDA (bf16). Each checks bytes against a first-principles count of the layout, bytes
against the format's theory (within 2%: packed storage), and the KL of the next-token distribution
against the bf16 float model of the same weights."""
from __future__ import annotations

import pytest
import torch

from qeval.models.load import ResolvedModel, fingerprint, load_model
from qeval.quant.formats import FORMATS

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TEXT = "The Australian bushfires forced residents to leave their homes near Sydney on Sunday."


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """The tiny model with larger weights: peaked next-token distributions, so KLs are measurable
    (on CPU, bf16: hqq:4bit:g64 KL 0.026, min/max int4 per 64 weights 0.032)."""
    from conftest import build_tiny_model

    d = build_tiny_model(tmp_path_factory.mktemp("peaked"), init_range=0.1)
    return ResolvedModel(str(d), d, fingerprint(d), "local")


@pytest.fixture(scope="module")
def reference(peaked):
    lm = load_model(peaked, FORMATS.get("none"), "cuda")
    assert lm.dtype == "bfloat16"
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids.to("cuda")
    weights = {n: m.weight.detach().clone() for n, m in lm.model.named_modules() if n.endswith(LINEAR)}
    with torch.no_grad():
        return ids, lm.model(ids).logits.float(), weights


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(float model || quantized model), in nats."""
    p = torch.log_softmax(ref_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _pad(n: int, m: int) -> int:
    return -(-n // m) * m


def _shapes(model):
    return [(m.out_features, m.in_features) for n, m in model.named_modules() if n.endswith(LINEAR)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["torchao:int4-tinygemm:g64", "torchao:int4-hqq:g64", "torchao:int4-tinygemm:g32"])
def test_torchao_tinygemm_bytes_and_kl(peaked, reference, name):
    pytest.importorskip("torchao")
    ids, ref, weights = reference
    fmt = FORMATS.get(name)
    lm = load_model(peaked, fmt.require("cuda"), "cuda")
    fp = lm.footprint
    group = int(name.rsplit(":g", 1)[1])
    kinds = {type(m.weight).__name__ for n, m in lm.model.named_modules() if n.endswith(LINEAR)}
    assert kinds == {"Int4TilePackedTo4dTensor"}, kinds
    shapes = _shapes(lm.model)
    assert fp.quantized_params == sum(o * i for o, i in shapes)
    # tinygemm's layout: rows padded to a multiple of 8, columns to a multiple of 1024; two codes a
    # byte; a bf16 scale and a bf16 zero per group of the padded row
    codes = sum(_pad(o, 8) * _pad(i, 1024) // 2 for o, i in shapes)
    state = sum(_pad(o, 8) * _pad(i, 1024) // group * 2 * 2 for o, i in shapes)
    assert (fp.quantized_weight_bytes, fp.quant_state_bytes) == (codes, state)
    theory = fp.theory_bytes - fp.unquantized_bytes
    assert (codes + state) / theory == pytest.approx(1, abs=0.02)
    with torch.no_grad():
        logits = lm.model(ids).logits.float()
    kl = _kl(ref, logits)
    assert torch.isfinite(logits).all() and 0.002 < kl < 0.15, kl

    if "tinygemm" in name:
        # The stored grid is asymmetric min/max int4 per group with the zero in the float domain,
        # computed in bf16 (torchao's tinygemm qparams): an independent bf16 simulation of that
        # recipe gives the weights the kernel holds. Measured on an H200 (2026-12-04): 95.6% (g64) /
        # 94.5% (g32) of the weights equal to the simulation's bit for bit, the rest within 0.063 /
        # 0.071 of a step (bf16 rounding in the dequantize arithmetic; another code would be a whole
        # step off); the kernel's matmul 0.0013 from its own grid against 0.079 / 0.070 from the
        # float weights. (The first GPU run compared the matmul with a float32 simulation: only 2x
        # closer than the float model, which the bf16 arithmetic explains.)
        lin = lm.model.model.layers[0].mlp.down_proj
        w = weights["model.layers.0.mlp.down_proj"].to("cuda", torch.bfloat16)
        g = w.reshape(-1, group)
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.bfloat16).smallest_normal)
        zero = lo + scale * 8
        q = torch.clamp(torch.round((g - (zero - scale * 8)) / scale), 0, 15)
        sim = ((q - 8) * scale + zero).reshape(w.shape).float()
        # the weights the kernel holds, read through the kernel itself (the packed tensor has no
        # dequantize): identity rows in, W^T out, exact (one bf16 product per output)
        with torch.no_grad():
            stored = lin(torch.eye(w.shape[1], device="cuda", dtype=torch.bfloat16)).float().t()
        step = float(scale.float().mean())
        same = float((stored == sim).float().mean())
        print(name, f"grid: {same:.4f} of weights equal to the simulation, max diff {float((stored - sim).abs().max()) / step:.3f} steps")
        assert same > 0.9 and float((stored - sim).abs().max()) < 0.25 * step  # in mean steps, as measured
        x = torch.randn(4, w.shape[1], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = lin(x).float()
        off_grid = (y - x.float() @ stored.t()).abs().mean()
        off_float = (y - x.float() @ w.float().t()).abs().mean()
        print(name, f"kernel vs its grid {float(off_grid):.4f}, vs the float weights {float(off_float):.4f}")
        assert off_grid < 0.1 * off_float, (float(off_grid), float(off_float))


@pytest.mark.gpu
def test_hqq_4bit_on_cuda_bytes_and_kl(peaked, reference):
    pytest.importorskip("hqq")
    ids, ref, _ = reference
    fmt = FORMATS.get("hqq:4bit:g64")
    lm = load_model(peaked, fmt.require("cuda"), "cuda")
    fp = lm.footprint
    layers = [m for m in lm.model.modules() if type(m).__name__ == "HQQLinear"]
    assert len(layers) == 14 and all(m.W_q.is_cuda and m.meta["scale"].dtype == torch.bfloat16 for m in layers)
    shapes = [(m.out_features, m.in_features) for m in layers]
    n = sum(o * i for o, i in shapes)
    assert fp.quantized_params == n
    # two 4-bit codes a byte; a bf16 scale and zero point per group of 64 (the compute dtype on CUDA)
    assert (fp.quantized_weight_bytes, fp.quant_state_bytes) == (n // 2, n // 64 * 2 * 2)
    theory = fp.theory_bytes - fp.unquantized_bytes
    assert theory == pytest.approx(n * (4 + 32 / 64) / 8, abs=len(shapes))
    with torch.no_grad():
        logits = lm.model(ids).logits.float()
    kl = _kl(ref, logits)
    assert torch.isfinite(logits).all() and 0.002 < kl < 0.15, kl
    # what it computes with is its own packed storage dequantized: (codes - zero) * scale
    lin = layers[0]
    x = torch.randn(3, lin.in_features, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(lin(x).float(), (x @ lin.dequantize().t()).float(), rtol=2e-2, atol=2e-2)


def test_cuda_only_formats_say_so_on_cpu():
    """The registry side, on any machine (the exit-2 line of `qeval run` is in tests/test_bad_input.py)."""
    from qeval.core.errors import QevalError

    for name in ("torchao:int4-tinygemm", "torchao:int4-hqq"):
        fmt = FORMATS.get(name)
        assert fmt.requires.needs_cuda and not fmt.lora_trainable and not fmt.can_save
        with pytest.raises(QevalError, match="needs CUDA"):
            fmt.require("cpu")
    assert not FORMATS.get("torchao:int4-wo").requires.needs_cuda  # the CPU schemes are unaffected


# ----------------------------------------------------------------------------- FP8 and MX (issue 22)

def _blocked(rows: int, blocks: int) -> int:
    """Scale bytes in torchao's blocked (swizzled) layout: rows padded to 128, blocks per row to 4."""
    return _pad(rows, 128) * _pad(blocks, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("name,kl_max", [("torchao:fp8-wo", 0.02), ("torchao:fp8-dyn", 0.05),
                                         ("torchao:mxfp8", 0.05), ("torchao:mxfp4", 0.6)])
def test_torchao_float_formats_on_cuda_bytes_and_kl(peaked, reference, name, kl_max):
    pytest.importorskip("torchao")
    ids, ref, _ = reference
    fmt = FORMATS.get(name)
    lm = load_model(peaked, fmt.require("cuda"), "cuda")
    fp = lm.footprint
    shapes = _shapes(lm.model)
    n = sum(o * i for o, i in shapes)
    assert fp.quantized_params == n
    measured = (fp.quantized_weight_bytes, fp.quant_state_bytes)
    if name.startswith("torchao:fp8"):  # one e4m3 byte a weight, an fp32 scale per row
        assert measured == (n, sum(4 * o for o, _ in shapes))
    else:  # MX: e4m3 bytes or two e2m1 codes a byte; one e8m0 byte per 32, plain or in the blocked layout
        codes = n if name.endswith("mxfp8") else n // 2
        assert measured[0] == codes
        assert measured[1] in (n // 32, sum(_blocked(o, i // 32) for o, i in shapes)), measured
    theory = fp.theory_bytes - fp.unquantized_bytes
    assert theory == pytest.approx(sum(o * i * fmt.bits_per_weight(i) / 8 for o, i in shapes), abs=len(shapes))
    with torch.no_grad():
        logits = lm.model(ids).logits.float()
    kl = _kl(ref, logits)
    assert torch.isfinite(logits).all() and 0 < kl < kl_max, kl


def test_fp8_and_mx_cuda_only_formats_say_so_on_cpu():
    from qeval.core.errors import QevalError

    for name in ("torchao:fp8-dyn", "torchao:mxfp8", "torchao:mxfp4"):
        with pytest.raises(QevalError, match="needs CUDA"):
            FORMATS.get(name).require("cpu")
    for name in ("torchao:fp8-wo", "torchao:nvfp4-wo", "quanto:float8"):  # measured to run on CPU
        FORMATS.get(name).require("cpu")
