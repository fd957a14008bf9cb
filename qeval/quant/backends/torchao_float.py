"""torchao's floating-point formats: `torchao:fp8-wo`, `torchao:fp8-dyn`, `torchao:nvfp4-wo`, and on CUDA
`torchao:mxfp8`, `torchao:mxfp4` (the torchao backend's parse hands these schemes here).

- fp8-wo: `Float8WeightOnlyConfig`, float8 e4m3 weights with one fp32 scale per row (`Float8Tensor`),
  activations stay float. Runs on CPU too (measured with torchao 0.18: the weight is dequantized for
  the matmul), so it is not CUDA-only.
- fp8-dyn: `Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`: e4m3 weights per row
  and activations quantized per token at run time (what "W8A8-FP8" serving runs). torchao asserts
  compute capability >= 8.9 (Ada / Hopper), so it needs CUDA and refuses older GPUs in one line.
- nvfp4-wo: `NVFP4WeightOnlyConfig`: e2m1 codes two per byte, one e4m3 scale per block of 16 and one
  fp32 scale per tensor (`NVFP4Tensor`). Runs on CPU (dequantized for the matmul); its scales are
  stored in the blocked (swizzled) layout padded to 128 rows x 4 blocks, which the measured bytes include.
- mxfp8 / mxfp4: `MXDynamicActivationMXWeightConfig` (OCP MX: one e8m0 scale per block of 32, weights
  and activations in e4m3 / e2m1). torchao computes them in bf16 only; SM100+ has the block-scaled
  kernels, below that torchao's emulated path (dequantize, bf16 matmul) gives the same numerics, so
  the format picks the kernel preference from the GPU and CPU is refused (the MX formats need CUDA).

Theory: codes + scales per the layout, without the swizzle padding (on SmolLM2's 576-wide rows the
scale padding is 2 of 18 blocks: +0.03 bits/weight for MX).
"""
from __future__ import annotations

import dataclasses

from qeval.core.errors import QevalError
from qeval.quant.formats import BACKENDS, QuantFormat, bad_option, quantizable_linears

SCHEMES = ("fp8-wo", "fp8-dyn", "nvfp4-wo", "mxfp8", "mxfp4")
CUDA_ONLY = ("fp8-dyn", "mxfp8", "mxfp4")
MIN_CAPABILITY = {"fp8-dyn": (8, 9), "mxfp8": (8, 0), "mxfp4": (8, 0)}  # MX: bf16 (emulated below 10.0)
MX_BLOCK, NV_BLOCK = 32, 16

# scheme -> (bits per weight from in_features, words, storage)
LAYOUT = {
    "fp8-wo": (lambda i: 8 + 32 / i, "float8 e4m3 weights, fp32 scale per row, float activations",
               "float8_e4m3fn codes + fp32 scale per row (Float8Tensor)"),
    "fp8-dyn": (lambda i: 8 + 32 / i, "float8 e4m3 weights (per-row scale) x float8 activations quantized "
                "per token at run time", "float8_e4m3fn codes + fp32 scale per row (Float8Tensor)"),
    "nvfp4-wo": (lambda i: 4 + 8 / NV_BLOCK, "NVFP4: e2m1 weights, e4m3 scale per block of 16 + fp32 per tensor, "
                 "float activations", "e2m1 codes two per byte + e4m3 scale per 16 (NVFP4Tensor)"),
    "mxfp8": (lambda i: 8 + 8 / MX_BLOCK, "MXFP8: e4m3 weights and activations, e8m0 scale per block of 32",
              "float8_e4m3fn codes + e8m0 scale per 32 (MXTensor)"),
    "mxfp4": (lambda i: 4 + 8 / MX_BLOCK, "MXFP4: e2m1 weights and activations, e8m0 scale per block of 32",
              "e2m1 codes two per byte + e8m0 scale per 32 (MXTensor)"),
}


def config(scheme: str):
    import torch

    if scheme == "fp8-wo":
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()
    if scheme == "fp8-dyn":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
        from torchao.quantization.granularity import PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    if scheme == "nvfp4-wo":
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        return NVFP4WeightOnlyConfig()
    from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig
    from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

    dtype = torch.float8_e4m3fn if scheme == "mxfp8" else torch.float4_e2m1fn_x2
    # the block-scaled MX matmul exists on SM100+ only; torchao's emulation elsewhere (same numerics)
    native = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (10, 0)
    return MXDynamicActivationMXWeightConfig(block_size=MX_BLOCK, activation_dtype=dtype, weight_dtype=dtype,
                                             kernel_preference=KernelPreference.AUTO if native else KernelPreference.EMULATED)


def _apply(scheme: str):
    def after_load(model, device: str, compute_dtype) -> None:
        from torchao.quantization import quantize_

        targets = {id(m) for _, m in quantizable_linears(model)}
        quantize_(model, config(scheme), filter_fn=lambda m, fqn: id(m) in targets)
    return after_load


def capability_problem(fmt_name: str) -> QevalError | None:
    """On CUDA (the CPU refusal comes first): the GPU's compute capability against the scheme's floor."""
    import torch

    scheme = fmt_name.split(":")[1]
    need = MIN_CAPABILITY.get(scheme)
    if need is None or not torch.cuda.is_available():
        return None
    have = torch.cuda.get_device_capability()
    if have >= need:
        return None
    return QevalError(f"quantization format {fmt_name}", f"compute capability {have[0]}.{have[1]}",
                      f"a GPU with compute capability >= {need[0]}.{need[1]}",
                      "run it on an Ada / Hopper or newer GPU" if scheme == "fp8-dyn" else "run it on an Ampere or newer GPU")


def parse(scheme: str, options: tuple[str, ...]) -> QuantFormat:
    name = f"torchao:{scheme}"
    if options:
        raise bad_option(name, options[0], "no options (the block / row layout is the format's own)")
    bits, words, storage = LAYOUT[scheme]
    block = {"nvfp4-wo": NV_BLOCK, "mxfp8": MX_BLOCK, "mxfp4": MX_BLOCK}.get(scheme, 0)
    requires = BACKENDS.get("torchao")
    if scheme in CUDA_ONLY:
        requires = dataclasses.replace(requires, needs_cuda=True, check=capability_problem)
    return QuantFormat(
        name, f"torchao {words}", bits, lambda compute_dtype: None, backend="torchao", after_load=_apply(scheme),
        kernel="real", storage=storage, can_save=False, lora_trainable=False,
        options=(("scheme", scheme), ("block", block or None)), packages=("torchao",), requires=requires,
        divides=block)
