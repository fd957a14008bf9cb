"""Tensor-subclass weights (torchao's Int8Tensor / IntxUnpackedToInt8Tensor, quanto's QBytes / QBits
tensors): the accounting and the dequantize both backends declare, written once."""
from __future__ import annotations

from typing import Any

from qeval.quant.backend import Held
from qeval.quant.footprint import flatten_tensor, is_subclass_tensor

# inner tensors of a subclass weight that hold the quantized values themselves (the rest is state)
DATA_NAMES = ("qdata", "_data", "data", "packed_weight", "int_data")


def account(module: Any) -> Held | None:
    """The codes and the scales / zero points are inner tensors of the module's own `weight`."""
    w = getattr(module, "_parameters", {}).get("weight")  # its own parameter (not a LoRA wrapper's view)
    if w is None or not is_subclass_tensor(w):
        return None
    parts = flatten_tensor(w)
    return Held("weight", data=tuple(t for path, t in parts if path.split(".")[0] in DATA_NAMES),
                state=tuple(t for path, t in parts if path.split(".")[0] not in DATA_NAMES))


def dequantize(model: Any, dtype: Any) -> Any:
    """Replace every linear layer whose weight is a tensor subclass by a float Linear holding its
    dequantized weight (the subclass's own `dequantize`). Returns the (same) model."""
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            w = getattr(child, "weight", None)
            if not isinstance(child, torch.nn.Linear) or not is_subclass_tensor(w):
                continue
            lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  dtype=dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w.dequantize().to(dtype))
                if child.bias is not None:
                    lin.bias.copy_(child.bias.detach().to(dtype))
            setattr(parent, name, lin)
    return model
