"""HQQ formats (qeval.quant.backends.hqq) on the tiny model, CPU: names and group checks, bytes against
first-principles counts, the stored codes / scales / zero points against an independent numpy
implementation of HQQ's algorithm, LoRA on an HQQ base and its merges."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qeval.core.errors import QevalError
from qeval.models.load import load_model
from qeval.quant.formats import FORMATS
from qeval.quant.backends.hqq import PACKING

pytest.importorskip("hqq")

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _hqq_layers(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == "HQQLinear"]


@pytest.fixture(scope="module")
def baseline(resolved):
    lm = load_model(resolved, FORMATS.get("none"), "cpu")
    ids = lm.tokenizer("The Australian bushfires forced residents to leave their homes.", return_tensors="pt").input_ids
    weights = {n: m.weight.detach().clone() for n, m in lm.model.named_modules() if n.endswith(LINEAR)}
    with torch.no_grad():
        return ids, lm.model(ids).logits, weights


# ----------------------------------------------------------------------------- names and shapes

def test_names_are_canonical_and_listed():
    assert FORMATS.get("hqq:4bit").name == "hqq:4bit:g64"  # hqq's default group, explicit
    assert FORMATS.get("hqq:4bit:g64").spec(torch.float32) == FORMATS.get("hqq:4bit").spec(torch.float32)
    assert {f"hqq:{b}bit" for b in (8, 4, 3, 2, 1)} <= set(FORMATS)
    spec = FORMATS.get("hqq:3bit:g32").spec(torch.float32)
    assert spec["options"] == {"axis": 1, "group": 32, "nbits": 3} and "hqq" in spec["backend_versions"]


@pytest.mark.parametrize("name,needles", [
    ("hqq:5bit", ["5bit", "4bit"]),
    ("hqq:4bit:g36", ["g36", "multiple of 8"]),
    ("hqq:4bit:64", ["64", "gN"]),
])
def test_bad_names_say_what_would_work(name, needles):
    with pytest.raises(QevalError) as e:
        FORMATS.get(name)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_group_checked_against_layer_widths():
    smol = {"q/k/v/gate/up_proj": 576, "o_proj": 576, "down_proj": 1536}
    assert not FORMATS.get("hqq:4bit:g64").check_shapes(smol, "smollm2")
    (err,) = FORMATS.get("hqq:4bit:g128").check_shapes(smol, "smollm2")
    assert "group/block size 128" in str(err) and "576" in str(err)


# ----------------------------------------------------------------------------- bytes

def _first_principles_bytes(nbits: int, group: int, shapes) -> tuple[int, int]:
    """(packed code bytes, scale + zero bytes) of hqq's layout: codes of a [out*in/group, group]
    matrix packed along its first dimension (3 bits: rows padded to a multiple of 10, 10 codes per
    int32), one float32 scale and one zero point per group."""
    per, word = PACKING[nbits]
    codes = state = 0
    for o, i in shapes:
        rows = o * i // group
        codes += -(-rows // per) * group * word // 8
        state += 2 * rows * 4
    return codes, state


@pytest.mark.parametrize("nbits,group", [(8, 64), (4, 64), (4, 32), (3, 32), (2, 16), (1, 8)])
def test_bytes_and_theory(resolved, baseline, nbits, group):
    fmt = FORMATS.get(f"hqq:{nbits}bit:g{group}")
    lm = load_model(resolved, fmt, "cpu")
    fp = lm.footprint
    layers = _hqq_layers(lm.model)
    assert len(layers) == 14 and not any(isinstance(m, torch.nn.Linear) for n, m in lm.model.named_modules()
                                         if n.endswith(LINEAR))
    shapes = [(m.out_features, m.in_features) for _, m in layers]
    assert fp.quantized_params == sum(o * i for o, i in shapes)
    codes, state = _first_principles_bytes(nbits, group, shapes)
    assert (fp.quantized_weight_bytes, fp.quant_state_bytes) == (codes, state)
    theory = fp.theory_bytes - fp.unquantized_bytes
    bits = {8: 8, 4: 4, 3: 3.2, 2: 2, 1: 1}[nbits] + 64 / group
    assert theory == pytest.approx(fp.quantized_params * bits / 8, abs=len(shapes))
    assert (codes + state) / theory == pytest.approx(1, abs=0.02)  # packed storage: within 2%
    ids, ref, _ = baseline
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert torch.isfinite(logits).all() and 0 < (logits - ref).abs().max() < 2


# ----------------------------------------------------------------------------- numerics

def _unpack(packed: torch.Tensor, nbits: int, rows: int) -> np.ndarray:
    """hqq's bit layout read independently: slice j of the first dimension sits at bit offset
    nbits * (per - 1 - j) of each word."""
    per, _ = PACKING[nbits]
    p = packed.numpy().astype(np.int64)
    mask = (1 << nbits) - 1
    return np.concatenate([(p >> (nbits * (per - 1 - j))) & mask for j in range(per)])[:rows]


def _hqq_reference(w: np.ndarray, nbits: int, group: int):
    """HQQ's calibration-free quantizer written out (Badri & Shaji 2023; hqq 0.2.8's defaults:
    min/max init, zero rounded for 4 bits, proximal zero-point solver with lp = 0.7, beta = 10,
    20 iterations, stop at the first iteration whose L1 error does not improve, keeping the zero
    that iteration computed). Returns (codes, scale, zero) per group, numpy float32."""
    w = w.astype(np.float32).reshape(-1, group)
    qmax = np.float32(2 ** nbits - 1)
    lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
    denom = hi - lo
    scale = np.where(np.abs(denom) <= 1e-4, np.float32(1), qmax / denom).astype(np.float32)
    scale = np.minimum(scale, np.float32(2e4))
    zero = -lo * scale
    if nbits == 4:
        zero = np.round(zero)
    beta, lp, best = np.float32(10), np.float32(0.7), np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(20):
            q = np.clip(np.round(w * scale + zero), 0, qmax)
            r = (q - zero) / scale
            e = w - r
            a = np.abs(e)
            shrunk = np.sign(e) * np.maximum(a - (1 / beta) * a ** (lp - 1), 0)
            zero = np.mean(q - (w - shrunk) * scale, axis=1, keepdims=True, dtype=np.float32)
            err = float(np.abs(w - r).mean(dtype=np.float32))
            if err < best:
                best = err
            else:
                break
    q = np.clip(np.round(w * scale + zero), 0, qmax)
    return q, (1 / scale).astype(np.float32), zero.astype(np.float32)


@pytest.mark.parametrize("nbits,group", [(4, 32), (3, 64), (2, 16)])
def test_codes_scales_zeros_match_an_independent_hqq(resolved, baseline, nbits, group):
    _, _, weights = baseline
    lm = load_model(resolved, FORMATS.get(f"hqq:{nbits}bit:g{group}"), "cpu")
    for name, layer in _hqq_layers(lm.model):
        w = weights[name].numpy()
        rows = w.size // group
        codes = _unpack(layer.W_q.data, nbits, rows)
        q, scale, zero = _hqq_reference(w, nbits, group)
        np.testing.assert_allclose(layer.meta["scale"].numpy(), scale, rtol=1e-6)
        np.testing.assert_allclose(layer.meta["zero"].numpy(), zero, rtol=1e-4, atol=1e-4)
        # codes: equal but for the odd weight on a rounding boundary (float sums in another order)
        assert (codes == q).mean() > 0.999, name
        # what the model computes with is (codes - zero) * scale, row by row in the layer's shape
        deq = ((codes - layer.meta["zero"].numpy()) * layer.meta["scale"].numpy()).reshape(w.shape)
        np.testing.assert_allclose(layer.dequantize().numpy(), deq, rtol=1e-6, atol=1e-7)
        x = torch.randn(3, w.shape[1])
        with torch.no_grad():
            torch.testing.assert_close(layer(x), x @ torch.from_numpy(deq).float().t(), rtol=1e-4, atol=1e-5)


def test_one_quantizing_thread_gives_the_same_weights(resolved):
    """CPU quantization runs on one thread (fast under load); the result is that of any thread count."""
    from hqq.core.quantize import HQQLinear

    from qeval.quant.backends.hqq import quant_config

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False)
    out = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            q = HQQLinear(lin, quant_config(4, 64), del_orig=False, compute_dtype=torch.float32, device="cpu")
            out.append((q.W_q.clone(), q.meta["scale"].clone(), q.meta["zero"].clone()))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*out):
        assert torch.equal(a, b)
    lm = load_model(resolved, FORMATS.get("hqq:4bit"), "cpu")
    assert torch.get_num_threads() == old and lm.footprint.quantized_params  # restored after loading


# ----------------------------------------------------------------------------- LoRA

TINY = dict(steps=4, batch_size=2, seq_len=32, eval_every=2, lr=1e-2, warmup_steps=1)
BASE = "hqq:4bit:g32"


def test_lora_trains_on_hqq_and_merges_like_an_independent_merge(resolved, baseline):
    from safetensors.torch import load_file

    from qeval.train.merge import attach
    from qeval.train.recipe import finetune
    from qeval.train.spec import AdapterSpec

    ids, _, _ = baseline
    assert FORMATS.get(BASE).lora_trainable
    art = finetune(resolved, AdapterSpec(train_quant=BASE, **TINY), "cpu", isolate=False)
    lora = load_file(str(art.path / "adapter_model.safetensors"))
    bs = {k: v for k, v in lora.items() if "lora_B" in k}
    assert len(bs) == 14 and all(v.abs().max() > 0 for v in bs.values())  # gradients reached every layer
    assert art.heldout[-1][1] < art.heldout[0][1]

    def logits(m):
        with torch.no_grad():
            return m(input_ids=ids).logits.float()

    unmerged_lm = attach(load_model(resolved, FORMATS.get(BASE), "cpu"), art)
    assert {type(m).__name__ for m in unmerged_lm.model.modules()} >= {"HqqLoraLinear", "HQQLinear"}
    unmerged = logits(unmerged_lm.model)

    merged_lm = attach(load_model(resolved, FORMATS.get(BASE), "cpu"), art, merge="dequantized")
    assert merged_lm.footprint.quantized_params == 0 and not _hqq_layers(merged_lm.model)
    # independent merge: hqq's dequantized weight + B @ A * alpha / r, in a float copy of the model
    base = load_model(resolved, FORMATS.get(BASE), "cpu").model
    flat = load_model(resolved, FORMATS.get("none"), "cpu").model
    q = dict(_hqq_layers(base))
    scale = art.spec.alpha / art.spec.r
    with torch.no_grad():
        for name, mod in flat.named_modules():
            if name in q:
                a, b = lora[f"base_model.model.{name}.lora_A.weight"], lora[f"base_model.model.{name}.lora_B.weight"]
                mod.weight.copy_(q[name].dequantize() + b @ a * scale)
    torch.testing.assert_close(logits(merged_lm.model), logits(flat), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(merged_lm.model), unmerged, rtol=1e-4, atol=1e-4)

    requant = attach(load_model(resolved, FORMATS.get(BASE), "cpu"), art, merge="requantized")
    assert requant.fmt.name == BASE and len(_hqq_layers(requant.model)) == 14
    FORMATS.get(BASE).after_load(flat, "cpu", torch.float32)  # hqq quantizes the independent merge
    torch.testing.assert_close(logits(requant.model), logits(flat), rtol=1e-5, atol=1e-5)


def test_bf16_layers_hold_16_bit_scales_and_the_theory_follows(resolved):
    """On CUDA the model computes in bf16 and hqq keeps scale / zero in that dtype: the footprint's
    theory is the layer's (4 + 2 * 16 / 64 bits), not the float32 CPU figure. Checked here on CPU in bf16."""
    lm = load_model(resolved, FORMATS.get("hqq:4bit:g64"), "cpu", dtype=torch.bfloat16)
    fp = lm.footprint
    n = fp.quantized_params
    assert {m.meta["scale"].dtype for _, m in _hqq_layers(lm.model)} == {torch.bfloat16}
    assert (fp.quantized_weight_bytes, fp.quant_state_bytes) == (n // 2, n // 64 * 2 * 2)
    assert fp.theory_bytes - fp.unquantized_bytes == pytest.approx(n * 4.5 / 8, abs=14)
    assert FORMATS.get("hqq:4bit:g64").bits_per_weight(576) == 5.0  # the registry's figure: float32 (CPU)


def test_opt_in_plan_names_valid_hqq_formats_for_the_real_model():
    from pathlib import Path

    import yaml

    plan = yaml.safe_load((Path(__file__).parents[1] / "plans" / "formats-full.yaml").read_text())
    hqq = [f for f in plan["formats"] if str(f).startswith("hqq:")]
    smol = {"q/k/v/gate/up_proj": 576, "o_proj": 576, "down_proj": 1536}
    assert hqq and all(FORMATS.get(f).name == f and not FORMATS.get(f).check_shapes(smol, "smollm2") for f in hqq)
