"""Stage: GGUF parity against llama.cpp's runtime, after a plan's cells (the plan's `parity:`).

For each model of the plan whose weights came from a GGUF file (the embedded model, or a .gguf
path: the file is the template every written format copies its metadata and tokenizer from),
`qeval.eval.parity.run_parity` writes a real .gguf file per format, scores it with llama.cpp and
with qeval's simulation, and the result is stored as one immutable `ParityRecord`, keyed by the
model's fingerprint, the settings, the runtime's build and the library versions. A stored key is
never recomputed. Where the runtime is not built (`qeval parity --setup`) the stage is skipped
with that one line, as an optional format is: the plan's cells do not depend on it.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

from qeval.core import env
from qeval.core.files import content_key
from qeval.run.plan import ParitySpec
from qeval.run.record import build_parity_record


def parity_key(model, spec: ParitySpec, runtime: str, versions: dict) -> str:
    from qeval.store.store import SCHEMA_VERSION

    return content_key({"kind": "parity", "schema": SCHEMA_VERSION, "model": model.fingerprint,
                        "settings": dataclasses.asdict(spec), "runtime": runtime, "versions": versions})


def parity_stage(models: list, spec: ParitySpec, store, progress: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Run the parity check for every GGUF-sourced model not stored yet: (keys stored, one line per
    model whose check failed; the cells are stored already and stay)."""
    from qeval.eval.parity import GGUF_SOURCES, run_parity
    from qeval.quant.backends import llama_runtime

    done, failed = [], []
    reason = llama_runtime.missing_reason()
    for model in models:
        tag = f"parity {model.spec}"
        if model.source not in GGUF_SOURCES:
            progress(f"qeval: skipped {tag}: its weights did not come from a GGUF file (llama.cpp needs one "
                     "as the template); run `qeval parity --model FILE.gguf` on a converted file")
            continue
        if reason:
            progress(f"qeval: skipped {tag}: {reason}")
            continue
        runtime = llama_runtime.build_info().get("source", "llama-cpp-python")
        versions = env.versions()
        key = parity_key(model, spec, runtime, versions)
        if store.has_parity(key):
            progress(f"{tag}: stored, nothing to compute")
            continue
        t0 = time.perf_counter()
        try:
            result = run_parity(model.spec, list(spec.formats), spec.docs, spec.ctx,
                                env.cache_dir() / "parity" / key[:16], log=lambda s: progress(f"{model.spec}: {s}"))
        except Exception as e:  # noqa: BLE001 -- reported like a failed cell, the run goes on
            from qeval.run.jobs import error_line

            failed.append(error_line(tag, e))
            progress(f"FAILED {error_line(tag, e)}")
            continue
        record = build_parity_record(key, model, dataclasses.asdict(spec), result, time.perf_counter() - t0, versions)
        store.put_parity(record)
        done.append(key)
    return done, failed
