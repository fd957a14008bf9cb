"""Speed of a loaded model: prefill tokens/s, greedy decode tokens/s at fixed batches, time to first
token and peak memory while generating. One source of truth for every speed number qeval prints
(the run's speed records and `qeval bench`).

Kept short on purpose: it runs inside the job that already loaded an arm for its accuracy cells, once
per arm, so every format of a plan is measured on the device its cells ran on without another load.
The prompts are a fixed token sequence (the same ids for every format and run: speed must not depend
on which documents a suite holds), so the numbers compare across formats and stores.

Decode steps are timed from inside `generate` (a logits processor stamps each step): the first stamp
is the time to first token (prefill + first step), the gaps after it are one decode forward each, so
one `generate` per batch gives both without a second prefill.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass

from qeval.models.memory import PeakMemory

# Token ids for the prompts: a fixed stride over the vocabulary (no tokenizer, no data file: the same
# sequence on every machine); ids below 100 hold special and byte tokens in most vocabularies.
_FIRST_ID, _STRIDE = 100, 7919


@dataclass(frozen=True)
class SpeedSettings:
    """What one speed measurement runs; all of it is part of a speed record's key."""

    prompt_tokens: int = 128  # the prompt length of prefill and of every decode
    prefill_batch: int = 4  # the suite's batch (qeval.run.cells.speed_cell picks it)
    new_tokens: int = 16  # greedy tokens generated per sequence
    decode_batches: tuple[int, ...] = (1, 8)
    warmup: int = 1  # untimed short passes first (kernel selection, first-call allocations)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "decode_batches": list(self.decode_batches),
                "prompts": f"fixed ids {_FIRST_ID} + {_STRIDE}*i mod vocab", "decoding": "greedy"}


def prompt_ids(batch: int, tokens: int, vocab: int):
    """The fixed prompt batch: row r, position i holds id 100 + (7919 * (i + r * tokens)) mod (vocab - 100)."""
    import torch

    i = torch.arange(batch * tokens, dtype=torch.long).reshape(batch, tokens)
    return _FIRST_ID + (i * _STRIDE) % max(1, vocab - _FIRST_ID)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_speed(loaded, settings: SpeedSettings) -> dict:
    """Speed of `loaded` (a qeval.models.load.LoadedModel, or anything with .model, .tokenizer,
    .device): prefill tokens/s at `prefill_batch`, per decode batch its decode tokens/s and time to
    first token, the peak memory of the generating part and the seconds the whole measurement took."""
    import torch

    t_all, cpu_all = time.perf_counter(), time.process_time()
    model, device = loaded.model, loaded.device
    vocab = int(model.config.vocab_size)
    dev = next(model.parameters()).device
    pad = getattr(loaded.tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else getattr(loaded.tokenizer, "eos_token_id", 0)

    def ids(batch: int, n: int):
        return prompt_ids(batch, n, vocab).to(dev)

    def generate(batch: int, new: int) -> list[float]:
        stamps: list[float] = []

        def stamp(input_ids, scores):  # a LogitsProcessor: called once per generated token
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

        x = ids(batch, settings.prompt_tokens)
        t0 = time.perf_counter()
        model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=pad, logits_processor=[stamp], use_cache=True)
        return [t0, *stamps]

    out: dict = {}
    with torch.no_grad():
        for _ in range(settings.warmup):
            model(ids(1, 16))
            generate(1, 2)
        x = ids(settings.prefill_batch, settings.prompt_tokens)
        _sync(device)
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        out["prefill_tok_s"] = x.numel() / prefill_s
        decode = {}
        with PeakMemory(device) as peak:
            for b in settings.decode_batches:
                t = generate(b, settings.new_tokens)
                gaps = [t[i + 1] - t[i] for i in range(1, len(t) - 1)]  # one decode forward each
                decode[str(b)] = {"ttft_s": t[1] - t[0],
                                  "decode_tok_s": b / statistics.median(gaps) if gaps else float("nan"),
                                  "decode_s": t[-1] - t[1], "steps": len(gaps)}
    out["decode"] = decode
    out["peak_bytes"] = int(peak.peak_bytes)
    out["peak_kind"] = "cuda max allocated" if device.startswith("cuda") else "process peak RSS"
    out["seconds"] = time.perf_counter() - t_all
    # this process's CPU time (all threads): what the measurement costs, readable on a loaded machine
    out["cpu_s"] = time.process_time() - cpu_all
    return out
