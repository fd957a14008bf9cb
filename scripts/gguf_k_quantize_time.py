"""The quantize step alone for each GGUF K format on SmolLM2-135M: each format's `after_load` on a fresh
copy of the float model, with the per-tensor type census and packed bits per weight (README, "GGUF
K-quants through llama.cpp's own quantizer"). Needs `qeval setup --backend gguf-k`.

    PYTHONPATH=. python scripts/gguf_k_quantize_time.py
"""
import copy
import time

import torch

from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS, measure_footprint

FORMATS_TIMED = ["gguf:q2_k", "gguf:q3_k_s", "gguf:q3_k_m", "gguf:q3_k_l", "gguf:q4_k_s", "gguf:q4_k_m", "gguf:q5_k_s",
                 "gguf:q5_k_m", "gguf:q6_k", "gguf:iq4_nl", "gguf:iq4_xs", "gguf:q4_k_m:pure", "gguf:q4_0"]

if __name__ == "__main__":
    base = load_model(resolve_model("smollm2-135m"), FORMATS.get("none"), "cpu").model
    for name in FORMATS_TIMED:
        fmt, model = FORMATS.get(name), copy.deepcopy(base)
        t0 = time.perf_counter()
        fmt.after_load(model, "cpu", torch.float32)
        dt = time.perf_counter() - t0
        fp = measure_footprint(model, fmt)
        total = sum(fp.packed_types.values()) or 1
        types = ", ".join(f"{t} {100 * n / total:.1f}%" for t, n in sorted(fp.packed_types.items(), key=lambda kv: -kv[1]))
        print(f"{name:18s} {dt:6.1f} s  {fp.packed_bytes * 8 / fp.quantized_params:.3f} bits/w  {types}", flush=True)
        del model
