"""Quantization formats on the tiny model: dtype census, measured bytes vs theory, working forward."""
import pytest
import torch

from qeval.models.load import load_model
from qeval.quant.formats import DEFAULT_FORMATS, FORMATS

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPECTED_QUANT_TYPE = {"bnb-int8": "Int8Params:int8", "bnb-nf4": "Params4bit:uint8", "bnb-nf4-dq": "Params4bit:uint8",
                       "bnb-fp4": "Params4bit:uint8", "bnb-fp4-dq": "Params4bit:uint8"}


@pytest.fixture(scope="module")
def baseline_logits(resolved):
    lm = load_model(resolved, FORMATS.get("none"), "cpu")
    with torch.no_grad():
        return lm.model(_ids(lm)).logits


def _ids(lm):
    return lm.tokenizer("The Australian bushfires forced residents to leave their homes.", return_tensors="pt").input_ids


def _census(model):
    """parameter name -> 'ParamType:dtype' (litgpt-style exact census)."""
    return {n: f"{type(p).__name__}:{str(p.dtype).replace('torch.', '')}" for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", [f for f in DEFAULT_FORMATS if f != "none"])
def test_dtype_census_and_bytes(resolved, baseline_logits, name):
    fmt = FORMATS.get(name)
    lm = load_model(resolved, fmt, "cpu")
    census = _census(lm.model)
    linear = {n for n in census if any(f".{x}." in n for x in LINEAR)}
    assert len(linear) == 2 * len(LINEAR)  # 2 layers x 7 projections, all quantized
    assert {census[n] for n in linear} == {EXPECTED_QUANT_TYPE[name]}
    rest = set(census) - linear  # embeddings, norms, lm_head stay float32
    assert rest == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                    *(f"model.layers.{i}.{ln}.weight" for i in range(2) for ln in ("input_layernorm", "post_attention_layernorm"))}
    assert {census[n] for n in rest} == {"Parameter:float32"}

    fp = lm.footprint
    n_quant = sum(m.in_features * m.out_features for n, m in lm.model.named_modules() if n.endswith(LINEAR))
    assert fp.quantized_params == n_quant
    assert fp.total_bytes == fp.quantized_weight_bytes + fp.quant_state_bytes + fp.unquantized_bytes
    bits = 8 * (fp.quantized_weight_bytes + fp.quant_state_bytes) / n_quant
    theory_bits = sum(m.in_features * m.out_features * fmt.bits_per_weight(m.in_features)
                      for n, m in lm.model.named_modules() if n.endswith(LINEAR)) / n_quant
    assert fp.theory_bytes - fp.unquantized_bytes == pytest.approx(theory_bits * n_quant / 8, abs=len(linear))
    # Quant state, counted from first principles: the per-block scales the theory formula covers,
    # plus per-layer codebooks (16 fp32 for the 4-bit code, 256 for the nested 8-bit one, and the
    # nested offset) that it ignores; those dominate only in a model this tiny.
    shapes = [(m.out_features, m.in_features) for n, m in lm.model.named_modules() if n.endswith(LINEAR)]
    if name == "bnb-int8":
        expected_state = sum(4 * out for out, _ in shapes)  # one fp32 scale per output row
    elif name.endswith("-dq"):
        expected_state = sum(o * i // 64 + 4 * -(-o * i // 64 // 256) + 4 * 16 + 4 * 256 + 4 for o, i in shapes)
    else:
        expected_state = sum(4 * (o * i // 64) + 4 * 16 for o, i in shapes)
    assert fp.quant_state_bytes == expected_state
    assert bits >= theory_bits
    assert fp.quantized_weight_bytes == n_quant // (1 if name == "bnb-int8" else 2)

    with torch.no_grad():
        logits = lm.model(_ids(lm)).logits
    assert torch.isfinite(logits).all()
    assert logits.dtype == torch.float32  # CPU compute dtype
    diff = (logits - baseline_logits).abs().max().item()
    assert 0 < diff < 1.0, diff  # quantized: not identical, but the same model


@pytest.mark.parametrize("name,absmax_dtype,nested", [("bnb-nf4", torch.float32, False),
                                                       ("bnb-nf4-dq", torch.uint8, True)])
def test_double_quant_stores_8bit_scales(resolved, name, absmax_dtype, nested):
    # In a model this small the nested codebooks outweigh the saving; the real-model integration
    # test checks that double quantization makes the whole model smaller.
    lm = load_model(resolved, FORMATS.get(name), "cpu")
    states = [m.weight.quant_state for m in lm.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(states) == 14
    assert {s.absmax.dtype for s in states} == {absmax_dtype}
    assert all((s.state2 is not None) == nested for s in states)


def test_baseline_is_unquantized(resolved):
    lm = load_model(resolved, FORMATS.get("none"), "cpu")
    assert set(_census(lm.model).values()) == {"Parameter:float32"}
    assert lm.footprint.quantized_params == 0
    assert lm.footprint.total_bytes == lm.footprint.theory_bytes == sum(
        t.numel() * t.element_size() for t in [*lm.model.parameters(), *lm.model.buffers()])


def test_every_bnb_option_is_explicit():
    """transformers' defaults must not decide what we measure: compute dtype, quant type, double quant."""
    for name in ("bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "bnb-fp4-dq"):
        opts = FORMATS.get(name).spec(torch.bfloat16)["options"]
        assert opts["bnb_4bit_compute_dtype"] == "bfloat16"
        assert opts["bnb_4bit_quant_type"] == name.split("-")[1]
        assert opts["bnb_4bit_use_double_quant"] is name.endswith("-dq")
        assert opts["llm_int8_skip_modules"] == ["lm_head"]
    assert FORMATS.get("bnb-int8").spec(torch.float32)["options"]["llm_int8_threshold"] == 6.0


def test_unknown_format_suggests():
    from qeval.core.errors import QevalError

    with pytest.raises(QevalError, match=r"did you mean 'bnb-nf4'"):
        FORMATS.get("bnb-nf5")


@pytest.mark.gpu
def test_nf4_on_cuda_uses_bf16_compute(resolved):
    lm = load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cuda")
    assert lm.dtype == "bfloat16"
    assert {v for k, v in _census(lm.model).items() if "proj" in k} == {"Params4bit:uint8"}
    with torch.no_grad():
        out = lm.model(_ids(lm).to("cuda")).logits
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("name", ["bnb-nf4", "bnb-nf4-dq", "bnb-fp4"])
def test_cpu_4bit_compute_is_the_configured_float32(resolved, name):
    """bitsandbytes may repack 4-bit weights for a bf16 CPU kernel at the first forward; qeval keeps
    the configured float32 compute, so a layer's output is exactly x @ dequantized(W).T."""
    import bitsandbytes as bnb

    lm = load_model(resolved, FORMATS.get(name), "cpu")
    lin = lm.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        lm.model(_ids(lm))  # a whole forward first: where the repack would happen
        y = lin(x)
    assert not getattr(lin.weight.quant_state, "packing_format_for_cpu", False)
    w = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)
    assert lm.model.dtype == torch.float32
