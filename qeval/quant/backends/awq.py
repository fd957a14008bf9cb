"""AWQ (Lin et al. 2023, activation-aware weight quantization), calibration-based: `awq:w4[:gN]`.

Quantized by gptqmodel's AWQ (`QuantizeConfig(quant_method=METHOD.AWQ, format=FORMAT.GEMM)`) in the
same isolated venv as GPTQ (`qeval setup --backend gptq`): gptqmodel is the maintained quantizer
that has both (AutoAWQ, the original, is archived and pins old torch / transformers), so one venv,
one child process (`gptq_child.py`, `method: awq`) and one checkpoint cache serve both. The plan's
`calibration:` feeds it exactly as it feeds GPTQ; its content hash is in the format's spec.

qeval's environment reads the GEMM checkpoint's packed tensors (qweight [in, out/8] int32 with AWQ's
interleaved nibble order, qzeros [groups, out/8], fp16 scales [groups, out]) and dequantizes them
itself (`dequantize`): W[o, i] = scale[g, o] * (q[i, o] - zero[g, o]). Compute is simulated (float
weights holding exactly AWQ's values); the footprint records the checkpoint's packed bytes.
Default group 128 (AWQ's usual); SmolLM2-135M's 576-wide layers need g64 (or g32 / g96 / g192).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qeval.core.errors import ChildError
from qeval.quant.backend import mark, marked_account
from qeval.quant.backends import gptq
from qeval.quant.formats import BACKENDS, Backend, QuantFormat, group_option, quantizable_linears

if TYPE_CHECKING:
    import torch

BITS = {"w4": 4}  # gptqmodel's AWQ GEMM packs 4-bit codes only
DEFAULT_GROUP = 128
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble k of a word holds column AWQ_ORDER[k] = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 words [R, C/8] holding 8 codes each in AWQ's order -> int64 codes [R, C] in column order."""
    import torch

    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    codes = (words.unsqueeze(2) >> shifts.view(1, 1, per)) & ((1 << bits) - 1)  # [R, C/8, nibble]
    return codes[:, :, list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], packed.shape[1] * per)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
               bits: int = 4) -> torch.Tensor:
    """The float weight [out, in] of one AWQ GEMM linear."""
    q = unpack_awq(qweight, bits)  # [in, out]
    z = unpack_awq(qzeros, bits).repeat_interleave(group, dim=0)  # [in, out]
    s = scales.float().repeat_interleave(group, dim=0)
    return (s * (q - z).float()).t().contiguous()


def apply_checkpoint(model, folder: Path, bits: int, group: int) -> None:
    import torch

    tensors, qcfg = gptq.read_checkpoint(folder)
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gemm").lower()
    if fmt != "gemm":
        raise ChildError("AWQCheckpoint", f"{folder}: format {fmt!r}, expected gemm")
    with torch.no_grad():
        for name, m in quantizable_linears(model):
            key = name if f"{name}.qweight" in tensors else f"model.{name}" if f"model.{name}.qweight" in tensors else None
            if key is None:
                raise ChildError("AWQCheckpoint", f"{folder}: no packed weight for layer {name}")
            w = dequantize(tensors[f"{key}.qweight"], tensors[f"{key}.qzeros"], tensors[f"{key}.scales"], group, bits)
            if tuple(w.shape) != tuple(m.weight.shape):
                raise ChildError("AWQCheckpoint", f"{name}: dequantized {tuple(w.shape)} != {tuple(m.weight.shape)}")
            m.weight.copy_(w.to(m.weight.dtype))
            if m.bias is not None and f"{key}.bias" in tensors:
                m.bias.copy_(tensors[f"{key}.bias"].to(m.bias.dtype))
            mark(m, packed_bytes=gptq.packed_layer_bytes(tensors, key))
        # AWQ folds its per-channel activation scales into the op before each scaled linear (the
        # RMSNorm weights): those float tensors changed too, and the checkpoint holds them
        quantized = {f"{n}.weight" for n, _ in quantizable_linears(model)}
        for name, p in model.named_parameters():
            if name in quantized:
                continue
            for key in (name, f"model.{name}", name.removeprefix("model.")):
                t = tensors.get(key)
                if t is not None and tuple(t.shape) == tuple(p.shape):
                    p.copy_(t.to(p.dtype))
                    break


# gptqmodel's AWQ clip search walks output channels in batches of 256 or 64 and asserts one divides
# each layer's output width (awq_processor._compute_best_clip): checked here, in one line, instead
# of a child's AssertionError after minutes of calibration
OUT_MULTIPLE = 64


def _after_load(name: str, options: dict, cal: gptq.CalibrationSpec):
    def after_load(model, device: str, compute_dtype) -> None:
        from transformers import AutoTokenizer

        bad = {n: m.out_features for n, m in quantizable_linears(model) if m.out_features % OUT_MULTIPLE}
        if bad:
            from qeval.core.errors import QevalError

            listed = ", ".join(f"{n} ({f})" for n, f in sorted(bad.items())[:4]) + (" ..." if len(bad) > 4 else "")
            raise QevalError(f"format {name} on model {model.name_or_path}", listed,
                             f"layers whose output width is a multiple of {OUT_MULTIPLE} (gptqmodel's AWQ clip search)",
                             "use gptq: or another format for this model")
        model_dir = Path(model.name_or_path)
        folder = gptq.ensure_checkpoint(model_dir, AutoTokenizer.from_pretrained(model_dir), options, cal)
        apply_checkpoint(model, folder, options["bits"], options["group_size"])
    return after_load


def _parse(scheme: str, opts: tuple[str, ...], cal: gptq.CalibrationSpec | None = None) -> QuantFormat:
    group = group_option(f"awq:{scheme}", opts, DEFAULT_GROUP)
    name, bits = f"awq:{scheme}:g{group}", BITS[scheme]
    # "method" is what sends the child down gptqmodel's AWQ path (and keeps these keys apart from GPTQ's)
    options = {"method": "awq", "bits": bits, "group_size": group, "desc_act": False, "sym": False,
               "damp_percent": gptq.DAMP_PERCENT}
    cal = cal or gptq.CalibrationSpec()
    spec_options = {**options, "calibration": cal.identity(), "gptq_env": gptq.env_versions()}
    return QuantFormat(
        name, f"AWQ {bits}-bit, groups of {group}, fp16 scale + {bits}-bit zero per group; calibrated on "
        f"{cal.samples} x {cal.seq_len} tokens of {cal.data}; gptqmodel {gptq.GPTQ_VERSION} (isolated env), "
        "dequantized here (simulated)",
        lambda in_features, g=group: bits + (16 + bits) / g, lambda compute_dtype: None, backend="awq",
        after_load=_after_load(name, options, cal), kernel="simulated",
        storage="float weights holding the dequantized AWQ values (packed GEMM checkpoint cached)",
        can_save=False, lora_trainable=False, options=tuple(sorted(spec_options.items())),
        packages=(), requires=BACKENDS.get("awq"), divides=group,
        held_bits=lambda in_features, float_bits: float_bits)


BACKENDS.add("awq", Backend(
    "awq", "AWQ (activation-aware, calibration-based; gptqmodel in the GPTQ venv), simulated from its packed checkpoint",
    _parse, tuple(BITS), modules=(), extra="gptq", calibration=True, check=gptq.env_problem,
    option_help="AWQ schemes: w4; option gN (default g128)", colour="tab:brown", account=marked_account))
