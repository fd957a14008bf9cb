"""Distribution divergence of a variant from the baseline on a fixed token set.

Accuracy hides damage; KL divergence and top-1 agreement do not. Storing the baseline's
full-vocabulary log-probabilities for every token is what makes this expensive elsewhere (49,152
floats a token for SmolLM2). A top-k + rest-mass summary is cheaper but biased: on SmolLM2 with
NF4, k=128 missed 14% of the KL, because quantization moves probability inside the tail. We store
instead what the baseline's logits are a function of: the final hidden state of each token (576
floats) and, once, the output head. logits = hidden @ W.T (+ bias) is exact for the decoder-only
models qeval loads, so the KL below is the full-vocabulary KL, at 1/85 of the storage;
`tests/test_divergence.py` checks it against running both models directly. The comparison rides on
the forwards the perplexity task makes anyway (hooks), so it costs no extra model pass.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


CACHE_ENV = "QEVAL_REFERENCE_CACHE_MB"


def reference_cache_bytes() -> int:
    """The budget for baseline log-probabilities kept per run (`Reference.log_probs`), from
    $QEVAL_REFERENCE_CACHE_MB (default 1024; 0 turns it off). `qeval run` checks it up front."""
    from qeval.core.errors import QevalError

    raw = os.environ.get(CACHE_ENV, "1024")
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise QevalError(CACHE_ENV, raw, "a whole number of MiB (0 turns the cache off)",
                         f"e.g. export {CACHE_ENV}=1024, or unset it")
    return mb * 2**20


@dataclass
class Reference:
    """The baseline's view of the token set: for each forward window (keyed by a hash of its
    token ids), the last hidden state after the final norm; and, once, the output head."""

    hidden: dict  # window hash -> (T, H) float32 tensor
    weight: object  # (V, H) output head
    bias: object | None
    softcap: float | None  # final logit soft-capping (Gemma 2 style), None for most models
    # the dtype the baseline's head produced its logits in ("bfloat16" on GPU): the reference's
    # logits are recomputed in it, so a bf16 baseline is compared as the bf16 distribution it is
    # (recomputing in float32 instead put a KL floor of 4e-5 under a bf16 baseline on an H200)
    logits_dtype: str = "float32"

    def logits(self, key: str, device=None):
        """Baseline logits of a whole window, by the same op on the same shape, dtype and device as
        the model's own head (F.linear over all positions): GEMM blocking depends on the shape, and
        only the same shape gives bit-identical logits, i.e. a baseline-against-itself KL of 0."""
        import torch

        dtype = getattr(torch, self.logits_dtype)
        dev = torch.device(device or "cpu")
        cache = self.__dict__.setdefault("_head_on", {})
        if (dev, dtype) not in cache:  # the head moved once per device, not once per window
            cache[(dev, dtype)] = (self.weight.to(dev, dtype),
                                   None if self.bias is None else self.bias.to(dev, dtype))
        weight, bias = cache[(dev, dtype)]
        logits = torch.nn.functional.linear(self.hidden[key][None].to(dev, dtype), weight, bias)[0]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def log_probs(self, key: str, device=None):
        """The baseline's float32 log-probabilities (T-1, V) at a window's predicting positions and
        their argmax (T-1,), computed in `ROWS`-row chunks (the shape every earlier record used, so
        the values are bit-identical). On CPU they are kept for the next variant within a budget
        (`QEVAL_REFERENCE_CACHE_MB`, default 1024): the head GEMM over the whole vocabulary is ~16%
        of a CPU variant's perplexity + KL evaluation, and the 50 Lee documents' 5,002 positions x
        49,152 floats take 983 MB. Windows beyond the budget are recomputed, never evicted."""
        import torch
        import torch.nn.functional as F

        dev = torch.device(device or "cpu")
        cache = self.__dict__.setdefault("_lp_cache", {})
        if key in cache:
            return cache[key]
        baseline = self.logits(key, dev)[:-1]
        lp = torch.empty_like(baseline)
        for i in range(0, baseline.shape[0], ROWS):
            lp[i:i + ROWS] = F.log_softmax(baseline[i:i + ROWS], dim=-1)
        out = (lp, lp.argmax(-1))
        self.keep(key, *out)
        return out

    def keep(self, key: str, lp, top) -> None:
        """Keep a window's log-probabilities for the next variant, on CPU and within the budget."""
        budget = reference_cache_bytes()
        used = self.__dict__.get("_lp_cache_bytes", 0)
        if lp.device.type == "cpu" and used + lp.nbytes <= budget:
            self.__dict__.setdefault("_lp_cache", {})[key] = (lp, top)
            self._lp_cache_bytes = used + lp.nbytes

    def __getstate__(self):  # caches stay in their process: a Ray worker gets hidden states + head
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def save(self, path: Path, head_path: Path | None = None) -> None:
        """Hidden states to `path`; the output head to `head_path` when given (once per model: it is
        the same for every task, and at 49152x576 floats it is most of a reference's bytes), else
        into `path` too. Both writes are atomic with unique temporary names."""
        from safetensors.torch import save_file

        from qeval.core.files import atomic_write_with

        tensors = {f"h_{k}": h.contiguous() for k, h in self.hidden.items()}
        head = {"weight": self.weight.contiguous()}
        if self.bias is not None:
            head["bias"] = self.bias.contiguous()
        meta = {"softcap": str(self.softcap or ""), "logits_dtype": self.logits_dtype}
        if head_path is None:
            tensors.update(head)
        elif not Path(head_path).is_file():
            atomic_write_with(head_path, lambda tmp: save_file(head, tmp, metadata=meta))
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: Path, head_path: Path | None = None) -> "Reference":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            hidden = {k[2:]: f.get_tensor(k) for k in f.keys() if k.startswith("h_")}
            head_file = path if "weight" in f.keys() or head_path is None else head_path
        with safe_open(str(head_file), "pt") as h:
            bias = h.get_tensor("bias") if "bias" in h.keys() else None
            weight = h.get_tensor("weight")
        return cls(hidden, weight, bias, float(meta["softcap"]) if meta["softcap"] else None,
                   meta.get("logits_dtype", "float32"))


@dataclass
class Divergence:
    """Per-token KL(baseline || variant), top-1 agreement and Δp summarised as llama.cpp's
    `llama-perplexity --kl-divergence` prints them (`summarize`): every statistic is computed here,
    in the cell, in float64 over all compared tokens, so the record stays a few hundred bytes (the
    Lee corpus has 5,002 tokens: a per-token vector would be 40 KB a cell as float64)."""

    kl_mean: float
    kl_p90: float
    kl_p99: float
    kl_max: float
    top1_agree: float
    ppl_ratio: float  # token-level perplexity of the variant / the baseline's, on the same tokens
    tokens: int
    seconds: float  # time spent in the divergence arithmetic (the forwards are the task's own)
    kl_se: float | None = None  # standard error of kl_mean
    kl_median: float | None = None
    kl_p95: float | None = None
    kl_p999: float | None = None
    top1_se: float | None = None  # binomial standard error of top1_agree
    dp_mean: float | None = None  # Δp = p_variant(next token) - p_baseline(next token), as llama.cpp
    dp_se: float | None = None
    dp_rms: float | None = None
    dp_rms_se: float | None = None

    def metrics(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "seconds"}


def summarize(kl, agree, var_lp, ref_lp, seconds: float = 0.0) -> Divergence:
    """The statistics of llama.cpp's perplexity tool (tools/perplexity/perplexity.cpp, `kl_divergence`)
    over per-token values: `kl` KL(baseline || variant), `agree` whether both argmaxes match, `var_lp`
    and `ref_lp` the variant's and the baseline's log-probability of the actual next token.

    As llama.cpp: a mean's standard error is sqrt(var/(n-1)) with the population variance (= the
    sample standard deviation / sqrt(n)); percentiles interpolate linearly between order statistics
    at fraction*(n-1) (numpy's default); same-top's error is the binomial sqrt(p(1-p)/(n-1)); RMS Δp
    is sqrt(mean Δp²) with the delta-method error 0.5/RMS * se(Δp²)."""
    kl = np.asarray(kl, dtype=np.float64)
    agree = np.asarray(agree, dtype=np.float64)
    var_lp, ref_lp = np.asarray(var_lp, dtype=np.float64), np.asarray(ref_lp, dtype=np.float64)
    n = kl.size
    dp = np.exp(var_lp) - np.exp(ref_lp)

    def se(x):
        return float(x.std(ddof=1) / np.sqrt(n)) if n > 1 else None  # None, not NaN: the record is JSON

    p90, p95, p99, p999 = (float(v) for v in np.percentile(kl, [90, 95, 99, 99.9]))
    top1 = float(agree.mean())
    rms = float(np.sqrt(np.mean(dp ** 2)))
    return Divergence(kl_mean=float(kl.mean()), kl_p90=p90, kl_p99=p99, kl_max=float(kl.max()), top1_agree=top1,
                      ppl_ratio=float(np.exp(ref_lp.mean() - var_lp.mean())), tokens=int(n), seconds=seconds,
                      kl_se=se(kl), kl_median=float(np.median(kl)), kl_p95=p95, kl_p999=p999,
                      top1_se=float(np.sqrt(top1 * (1 - top1) / (n - 1))) if n > 1 else None,
                      dp_mean=float(dp.mean()), dp_se=se(dp), dp_rms=rms,
                      dp_rms_se=0.5 / rms * se(dp ** 2) if rms > 0 and n > 1 else (0.0 if n > 1 else None))


def _window_key(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()[:32]


ROWS = 64  # positions per chunk: (64 x vocabulary) temporaries stay in cache; 64 was fastest of 16-256


class Capture:
    """Hooks on a model that, during an ordinary evaluation pass, either record the baseline's
    hidden states (`reference=None`) or compare each forward with the reference.

    Riding on the perplexity task's own forwards costs no extra model pass. Through module hooks
    each forward must hold one sequence; `qeval.eval.lm.QevalLM` instead calls `observe` per row of a
    batched forward (padding cut off). A window whose ids the reference does not know is counted
    in `unmatched` and left out. Reference and comparison must use the same batch size (it is part
    of the task key): batching changes hidden states at float-rounding level.
    """

    def __init__(self, model, reference: Reference | None = None):
        self.model, self.ref = model, reference
        self.hidden: dict = {}
        self.kls: list = []
        self.agree: list = []
        self.var_tgt: list = []
        self.ref_tgt: list = []
        self.unmatched = 0
        self.batched = 0
        self.seconds = 0.0
        self.logits_dtype = "float32"
        self._ids = None
        self._handles: list = []
        self._own: dict = {}  # baseline only: window -> (log-probs, argmax), handed to the Reference

    def __enter__(self) -> "Capture":
        head = self.model.get_output_embeddings()
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         head.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids = None if ids is None else ids.detach()

    def _post(self, module, inputs, output) -> None:
        if self._ids is None:
            return
        if self._ids.shape[0] != 1:
            self.batched += 1
            return
        self.observe(self._ids[0], inputs[0][0], output[0])

    def observe(self, ids, hidden, logits, log_probs=None) -> None:
        """One window: its token ids (T,), final hidden states (T, H) and logits (T, V), and where
        the caller has them, the log-softmax of those logits in float32 (`qeval.eval.lm.QevalLM` computes
        it for the log-likelihoods anyway). Called by the hooks above, or by QevalLM per row of a
        (batched) forward."""
        import torch
        import torch.nn.functional as F

        t0 = time.perf_counter()
        ids = ids.detach().cpu()
        key = _window_key(ids.numpy())
        if self.ref is None:
            self.hidden[key] = hidden.detach().float().cpu().clone()
            self.logits_dtype = str(logits.dtype).removeprefix("torch.")
            if log_probs is not None and logits.dtype == torch.float32 and log_probs.device.type == "cpu":
                # the baseline's own log-probs are what `Reference.log_probs` would recompute (same
                # head op on the same shape; log-softmax is per row): the first variant skips that
                self._own[key] = (log_probs[:-1].detach().clone(), log_probs[:-1].argmax(-1))
        elif key not in self.ref.hidden:
            self.unmatched += 1
        else:
            with torch.no_grad():
                if log_probs is None:
                    log_probs = F.log_softmax(logits.detach().float(), dim=-1)
                # on the variant's device (a GPU does the vocabulary-wide arithmetic); only the
                # per-token results travel to the CPU
                variant = log_probs[:-1].detach()
                baseline, base_top = self.ref.log_probs(key, variant.device)
                targets = ids[1:].long().to(variant.device)
                # Whole-tensor ops in row chunks (see ROWS), no Python per token. On log-probabilities
                # lq, lp: KL = sum exp(lp) (lp - lq), one fused kernel (kl_div with log_target).
                kls, agree, vt, rt = [], [], [], []
                for i in range(0, variant.shape[0], ROWS):
                    rows = slice(i, i + ROWS)
                    lq = variant[rows]
                    lp = baseline[rows]
                    kls.append(F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1, dtype=torch.float64))
                    agree.append(base_top[rows] == lq.argmax(-1))
                    t = targets[rows, None]
                    vt.append(lq.gather(1, t)[:, 0].double())
                    rt.append(lp.gather(1, t)[:, 0].double())
                if kls:
                    self.kls.append(torch.cat(kls).clamp(min=0).cpu().numpy())  # clamp: rounding just below 0
                    self.agree.append(torch.cat(agree).cpu().numpy())
                    self.var_tgt.append(torch.cat(vt).cpu().numpy())
                    self.ref_tgt.append(torch.cat(rt).cpu().numpy())
        self.seconds += time.perf_counter() - t0

    def reference(self) -> Reference:
        head = self.model.get_output_embeddings()
        bias = head.bias.detach().float().cpu() if getattr(head, "bias", None) is not None else None
        ref = Reference(dict(self.hidden), head.weight.detach().float().cpu().clone(), bias,
                        getattr(getattr(self.model, "config", None), "final_logit_softcapping", None),
                        self.logits_dtype)
        for key, (lp, top) in self._own.items():
            ref.keep(key, lp, top)
        self._own = {}
        return ref

    def result(self) -> Divergence | None:
        if not self.kls:
            return None
        return summarize(np.concatenate(self.kls), np.concatenate(self.agree), np.concatenate(self.var_tgt),
                         np.concatenate(self.ref_tgt), self.seconds)


def _log_probs(model, ids: list[int], device: str):
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)  # (T-1, V): position t predicts token t+1


def exact_kl(base_model, model, docs: list[list[int]], device: str) -> np.ndarray:
    """KL(baseline || model) per token from both models' own logits: the truth to check against."""
    import torch

    out = []
    for ids in docs:
        p, q = _log_probs(base_model, ids, device).double(), _log_probs(model, ids, device).double()
        out.append((torch.exp(p) * (p - q)).sum(-1).cpu().numpy())
    return np.concatenate(out)
