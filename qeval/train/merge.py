"""Put a trained LoRA adapter on a loaded base, or merge it.

`attach(loaded, artifact, merge)`: `none` keeps the adapter unmerged; `dequantized` merges into the
dequantized float base (exactly the unmerged numbers); `requantized` then quantizes the merged
weights back to the base's format with the same backend (the deploy path that can lose the
fine-tune). Dequantizing is the base's backend's (`Backend.dequantize`); which bases merge is
`qeval.train.spec.merge_problem`.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from qeval.core.errors import QevalError
from qeval.core.files import fingerprint
from qeval.models.load import LoadedModel, ResolvedModel, load_model
from qeval.quant.backend import backend_of
from qeval.quant.formats import FORMATS, QuantFormat, measure_footprint
from qeval.train.artifact import AdapterArtifact
from qeval.train.spec import merge_problem


def attach(loaded: LoadedModel, artifact: AdapterArtifact, merge: str = "none") -> LoadedModel:
    """Put a LoRA adapter on `loaded` (unmerged), or merge it (see module docstring)."""
    import torch
    from peft import PeftModel

    if artifact.spec.method != "lora":
        raise QevalError("adapter", artifact.spec.method, "a LoRA adapter to attach",
                         "a full fine-tune is evaluated with load_finetuned()")
    t0 = time.perf_counter()
    model = loaded.model
    fmt = loaded.fmt
    if merge in ("dequantized", "requantized"):
        if problem := merge_problem(loaded.fmt.name, "merge"):
            raise problem
        model = dequantize_base(model, loaded.fmt, getattr(torch, loaded.dtype))
        fmt = FORMATS.get("none")
    model = PeftModel.from_pretrained(model, str(artifact.path), is_trainable=False)
    if merge != "none":
        model = model.merge_and_unload()
    model.eval()
    attached = dataclasses.replace(loaded, model=model, fmt=fmt, footprint=measure_footprint(model, fmt),
                                   load_s=loaded.load_s + time.perf_counter() - t0)
    if merge == "requantized":
        return _requantize(attached, loaded)
    return attached


def _requantize(merged: LoadedModel, original: LoadedModel) -> LoadedModel:
    """Save the merged float model and load it back at the original format (the same backend
    quantizes it again: bitsandbytes at load, torchao / quanto / GGUF after it)."""
    with tempfile.TemporaryDirectory(prefix="qeval-merged-") as tmp:
        t0 = time.perf_counter()
        merged.model.save_pretrained(tmp)
        merged.tokenizer.save_pretrained(tmp)
        resolved = ResolvedModel(f"{original.resolved.spec}+merged", Path(tmp), fingerprint(Path(tmp)), "merged")
        out = load_model(resolved, original.fmt, original.device)
    return dataclasses.replace(out, resolved=original.resolved,
                               load_s=merged.load_s + time.perf_counter() - t0)


def dequantize_base(model, fmt: QuantFormat, dtype):
    """Replace every quantized linear layer of `fmt`'s backend by a float Linear holding its
    dequantized weights (simulated backends' weights already are float and stay). Returns the model."""
    backend = backend_of(fmt)
    if backend is None or backend.dequantize is None:
        raise QevalError("merge base", fmt.name, "a format whose backend dequantizes its layers",
                         "merge paths exist for QLoRA-style arms on bnb 4-bit, torchao, quanto, GGUF, HQQ")
    return backend.dequantize(model, dtype)
