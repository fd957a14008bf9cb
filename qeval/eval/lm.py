"""qeval's lm-eval model: lm-eval's `HFLM`, scoring with the output head only where scores are read.

lm-eval's HF wrapper runs the whole model (`model(inps).logits`) and a log-softmax over the full
vocabulary at every position of every padded row, though a multiple-choice or loglikelihood request
reads only its continuation tokens (1-3 of ~20 positions in qeval's choice tasks). `QevalLM` runs
the model body (hidden states after the final norm), gathers the continuation positions of all rows
of a batch, and applies the head (+ logit soft-capping where the model has it) and log-softmax to
those rows only: one GEMM of (positions read x hidden) x (hidden x vocabulary) instead of (batch x
padded length x ...). Everything else (request ordering, batching, the one-token-continuation logits
cache, greedy check, results order) is lm-eval's own code path, copied from 0.4.13's
`HFLM._loglikelihood_tokens`; `tests/test_lm.py` checks per-request log-likelihoods against stock
`HFLM` (float tolerance: a smaller GEMM rounds differently) and accuracy for equality.

Requests that share a context (the choices of a multiple-choice question) are scored in **one
row**: the context once, then each choice's tokens after it as a branch that sees the context and
its own earlier tokens only (a 4-D attention mask and position ids that restart after the context;
`_tree_rows`). lm-eval's own sharing (one forward for choices that are all one token long) is the
special case of branches with no tokens. On the default suite's analogies this is 1.6x fewer tokens
through the model. The first group of every `QevalLM` is also scored row by row and compared (a
model whose attention ignores custom masks, e.g. flash-attention, or that uses positions another
way, fails the check and falls back to rows, with a warning).

Also here, because they ride on the same code path:
- tokenization reuse: `tok_encode` results are memoised per (tokenizer fingerprint, string) for the
  life of the process, so the arms of one run (same documents, same tokenizer) tokenize once;
- rolling perplexity windows are batched longest-first (less padding) instead of in document order;
- an `observer` (divergence.Capture) sees each window's hidden states and logits straight from the
  forward, batched or not, instead of hooking modules;
- a `recorder` list receives every forward's and generate call's inputs, so `qeval bench` can time
  a bare model over exactly the same windows and batching.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator
from lm_eval.models.utils_hf import pad_and_concat
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

_TOKENS: dict = {}  # (tokenizer fingerprint, string, options) -> token ids, for the process
_TOKENS_MAX = 500_000


def tokenizer_fingerprint(tok) -> str:
    """What the token ids of a string depend on: the tokenizer's full definition and its special
    tokens. Memoised on the object (hashing a 49k-entry vocabulary takes ~0.1 s)."""
    fp = getattr(tok, "_qeval_fp", None)
    if fp is None:
        backend = getattr(tok, "backend_tokenizer", None)
        body = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
        extra = repr((type(tok).__name__, tok.bos_token, tok.eos_token, getattr(tok, "add_bos_token", None),
                      getattr(tok, "add_eos_token", None)))
        fp = hashlib.sha256((body + extra).encode()).hexdigest()[:24]
        try:
            tok._qeval_fp = fp
        except AttributeError:
            pass
    return fp


def split_model(model):
    """(body, head, softcap) of a decoder-only causal LM, through a PEFT wrapper; None when the
    model does not have that shape (then the stock full-logits path runs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    if head is None or body is None or body is base:
        return None
    cfg = getattr(base, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None) or \
        getattr(getattr(cfg, "text_config", None), "final_logit_softcapping", None)
    return body, head, softcap


def head_logits(head, hidden, softcap):
    """Logits from final hidden states (..., H); the same op the model's own forward applies."""
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


_ROWS_ONLY = [False]


@contextlib.contextmanager
def rows_only():
    """Within: every QevalLM scores one request per row (lm-eval's layout); the bench's noise floor."""
    _ROWS_ONLY[0] = True
    try:
        yield
    finally:
        _ROWS_ONLY[0] = False


class QevalLM(HFLM):
    def __init__(self, *args, observer=None, recorder: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.observer, self.recorder = observer, recorder
        self._split = split_model(self.model) if self.backend == "causal" else None
        self._tok_fp = tokenizer_fingerprint(self.tokenizer)
        # choices scored in one row per context: None = not yet checked against rows, then True/False;
        # never with virtual tokens (prompt tuning shifts every position)
        prompt_learning = getattr(getattr(self.model, "active_peft_config", None), "is_prompt_learning", False)
        self._tree = False if (self._split is None or prompt_learning) else None
        if self._split is not None:
            cfg = getattr(self.model, "config", None)
            cfg = getattr(cfg, "text_config", None) or cfg
            # a sliding-window model sees the whole row only when the row fits the window
            self._window = getattr(cfg, "sliding_window", None) or 0
            emb = getattr(self._split[0], "get_input_embeddings", lambda: None)()
            dtype = getattr(getattr(emb, "weight", None), "dtype", torch.float32)
            self._body_dtype = dtype if dtype.is_floating_point else torch.float32  # the mask's dtype

    # -- tokenization, once per process -------------------------------------------------------
    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        if kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (self._tok_fp, self.add_bos_token, string, add_special_tokens, left_truncate_len)
        hit = _TOKENS.get(key)
        if hit is None:
            if len(_TOKENS) > _TOKENS_MAX:
                _TOKENS.clear()
            hit = _TOKENS[key] = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len))
        return list(hit)  # callers concatenate and slice: hand out a fresh list

    # -- rolling perplexity: windows longest-first, so a batch holds similar lengths ------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        bs = self.batch_size
        if bs == "auto" or int(bs) == 1 or self.world_size > 1:
            return super().loglikelihood_rolling(requests, disable_tqdm)
        windows = []  # (request index, window)
        for i, req in enumerate(requests):
            (string,) = req.args
            for w in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((i, (None,) + w))
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j][1][1]) - len(windows[j][1][2]))
        totals = [0.0] * len(requests)
        for s in range(0, len(order), int(bs)):
            batch = [windows[j] for j in order[s:s + int(bs)]]
            lls = self._loglikelihood_tokens([w for _, w in batch], disable_tqdm=True, override_bs=len(batch))
            for (i, _), (ll, _) in zip(batch, lls, strict=True):
                totals[i] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation: only recorded (for the bench) ----------------------------------------------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        if self.recorder is not None:
            self.recorder.append(("generate", context.detach().clone(),
                                  generation_kwargs.get("attention_mask"), max_length, stop))
        return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # -- log-likelihoods, head only on the positions read -------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self._split is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        if self._tree is not False and not _ROWS_ONLY[0] and self.observer is None and self.batch_size != "auto" \
                and requests and all(r[0] is not None for r in requests):  # rolling windows: rows
            out = self._tree_loglikelihood(requests)
            if out is not None:
                return out
        return self._row_loglikelihood(requests, disable_tqdm, override_bs)

    def _tree_loglikelihood(self, requests):
        """Requests grouped by context, one row per group (see the module docstring); None when the
        self-check on the first group fails (the caller then scores rows)."""
        groups: dict = {}  # context ids -> {continuation ids: [request indices]}
        rest = []  # requests that do not fit one row: scored by rows
        for i, (_, ctx, cont) in enumerate(requests):
            groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont), []).append(i)
        rows = []
        for ctx, conts in groups.items():
            width = len(ctx) + sum(len(c) - 1 for c in conts)
            if not ctx or width > self.max_length or (self._window and width > self._window):
                rest += [i for idx in conts.values() for i in idx]
            else:
                rows.append((ctx, list(conts.items()), width))
        res: list = [None] * len(requests)
        if rest:
            for i, ans in zip(rest, self._row_loglikelihood([requests[i] for i in rest], True), strict=True):
                res[i] = ans
        rows.sort(key=lambda r: -r[2])  # longest first: the first row of a batch sets its width
        batches, bs = [], int(self.batch_size)
        if self._tree is None and rows:  # once per instance: the tree agrees with plain rows
            first = [i for _, idx in rows[0][1] for i in idx]
            want = self._row_loglikelihood([requests[i] for i in first], True)
            got = self._tree_batch([rows[0]])
            # float rounding differs with the GEMM shapes; a wrong mask or positions moves a
            # log-likelihood by whole nats
            tol = 1e-3 if self._body_dtype == torch.float32 else 5e-2
            self._tree = self._tree_agrees(rows[0], got, want, tol)
            if not self._tree:
                return None
            batches.append(([rows[0]], got))  # the checked row's scores are kept
            rows = rows[1:]
        batches += [(rows[s:s + bs], None) for s in range(0, len(rows), bs)]
        for chunk, scores in batches:
            for row, scored in zip(chunk, scores or self._tree_batch(chunk), strict=True):
                for (_, idx), ans in zip(row[1], scored, strict=True):
                    for i in idx:
                        res[i] = ans
        done_by_rows = set(rest)  # the row path told the cache hook already
        for i, ((strs, _, _), ans) in enumerate(zip(requests, res, strict=True)):
            if i not in done_by_rows:
                self.cache_hook.add_partial("loglikelihood", strs, ans)
        return res

    def _tree_agrees(self, row, got, want, tol) -> bool:
        flat = [ans for (_, idx), ans in zip(row[1], got[0], strict=True) for _ in idx]
        ok = len(flat) == len(want) and all(
            abs(g[0] - w[0]) <= tol * (1 + abs(w[0])) and g[1] == w[1] for g, w in zip(flat, want))
        if not ok:
            import logging

            logging.getLogger("qeval").warning(
                "scoring a context's choices in one row disagrees with one row per choice on this model "
                "(attention that ignores a custom mask, or a format whose numerics depend on the batch's "
                "shape, e.g. LLM.int8's outlier columns or int8 activations): scoring row by row")
        return ok

    def _tree_batch(self, chunk):
        """One forward over tree rows; per row, per distinct continuation: (log-likelihood, greedy)."""
        body, head, softcap = self._split
        width = chunk[0][2]
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        seg = torch.full((len(chunk), width), -1, dtype=torch.long)  # 0 context, b+1 branch b, -1 pad
        pos = torch.zeros((len(chunk), width), dtype=torch.long)
        reads, targets = [], []  # (row, position) of each scored token, and the token it scores
        for r, (ctx, conts, _) in enumerate(chunk):
            n = len(ctx)
            ids[r, :n], seg[r, :n], pos[r, :n] = torch.tensor(ctx), 0, torch.arange(n)
            at = n
            for b, (cont, _) in enumerate(conts):
                branch = cont[:-1]  # the last token is only predicted, never fed
                k = len(branch)
                if k:
                    ids[r, at:at + k], seg[r, at:at + k] = torch.tensor(branch), b + 1
                    pos[r, at:at + k] = torch.arange(n, n + k)
                reads += [(r, n - 1)] + [(r, at + j) for j in range(k)]
                targets += list(cont)
                at += k
        q, k_ = seg[:, :, None], seg[:, None, :]
        idx = torch.arange(width)
        allowed = (idx[None, :, None] >= idx[None, None, :]) & ((k_ == 0) | (k_ == q)) & (q != -1) & (k_ != -1)
        allowed |= torch.eye(width, dtype=torch.bool)[None] & (q == -1)  # padding sees itself: no NaN
        mask = torch.zeros(allowed.shape, dtype=self._body_dtype)
        mask.masked_fill_(~allowed, torch.finfo(self._body_dtype).min)
        ids, mask, pos = ids.to(self.device), mask[:, None].to(self.device), pos.to(self.device)
        if self.recorder is not None:
            self.recorder.append(("forward", ids, [int(x) for x in (seg != -1).sum(1)],
                                  {"attention_mask": mask, "position_ids": pos}))
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            rr = torch.tensor([r for r, _ in reads], device=hidden.device)
            pp = torch.tensor([p for _, p in reads], device=hidden.device)
            logp = F.log_softmax(head_logits(head, hidden[rr, pp][None], softcap)[0], dim=-1, dtype=self.softmax_dtype)
        tgt = torch.tensor(targets, device=logp.device)
        ll = logp.gather(1, tgt[:, None])[:, 0].double().cpu()
        greedy = (logp.argmax(-1) == tgt).cpu()
        out, at = [], 0
        for _, conts, _ in chunk:
            scored = []
            for cont, _ in conts:
                n = len(cont)
                scored.append((float(ll[at:at + n].sum()), bool(greedy[at:at + n].all())))
                at += n
            out.append(scored)
        return out

    def _row_loglikelihood(self, requests, disable_tqdm: bool = False, override_bs=None):
        """lm-eval's row-per-request scoring, with the head only on the positions read."""
        body, head, softcap = self._split
        res = []

        def _collate(req):  # as lm-eval: longest first, so the first row of a batch sets its width
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def _lookup_one_token_cont(req):  # as lm-eval: share one forward among one-token choices
            return req[-2] + req[-1][:-1]

        re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                          group_fn=_lookup_one_token_cont)
        n_reordered = len(re_ord)
        batch_size = self.batch_size if self.batch_size != "auto" else (override_bs if override_bs is not None else 0)
        batch_fn = self._batch_scheduler if self.batch_size == "auto" and n_reordered > 0 and not override_bs else None
        if batch_fn is not None:
            self.batch_sizes = {}
        for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
            inps, inplens, cont_toks_list = [], [], []
            for _, context_enc, continuation_enc in chunk:
                assert len(context_enc) > 0 and 0 < len(continuation_enc) <= self.max_length
                inp = torch.tensor((context_enc + continuation_enc)[-(self.max_length + 1):][:-1],
                                   dtype=torch.long, device=self.device)
                inps.append(inp)
                inplens.append(inp.shape[0])
                cont_toks_list.append(continuation_enc)
            padding_len_inp = max(inplens)
            batched = pad_and_concat(padding_len_inp, inps, padding_side="right")  # zeros, as lm-eval
            if self.recorder is not None:
                self.recorder.append(("forward", batched, inplens))
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                # use_cache=False: a scoring pass has no next step, building a KV cache is waste
                hidden = body(input_ids=batched, use_cache=False).last_hidden_state  # (B, P, H)
                shift = hidden.shape[1] - padding_len_inp  # virtual tokens (prompt tuning), else 0
                if self.observer is not None:
                    # divergence: each window's full hidden states and logits, by the head applied
                    # to that window alone (the shape the reference's logits are computed in)
                    picked = []
                    for i, inplen in enumerate(inplens):
                        h = hidden[i, shift:shift + inplen]
                        logits = head_logits(head, h[None], softcap)[0]
                        logp = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                        # float32 log-probs are what divergence needs too: computed once, shared
                        self.observer.observe(batched[i, :inplen], h, logits,
                                              logp if logp.dtype == torch.float32 else None)
                        picked.append(logp[inplen - len(cont_toks_list[i]):])
                else:
                    # the positions whose scores are read: [inplen - contlen, inplen) of each row
                    sel = torch.cat([hidden[i, shift + inplen - len(c):shift + inplen]
                                     for i, (inplen, c) in enumerate(zip(inplens, cont_toks_list))])
                    logp = F.log_softmax(head_logits(head, sel[None], softcap)[0], dim=-1, dtype=self.softmax_dtype)
                    picked = list(torch.split(logp, [len(c) for c in cont_toks_list]))
            for (request_str, ctx_tokens, _), logits, cont_toks in zip(chunk, picked, cont_toks_list, strict=True):
                logits = logits.unsqueeze(0)  # [1, contlen, vocab], as lm-eval's after its slice
                greedy_tokens = logits.argmax(dim=-1)
                for request_str, cont_toks, logits in re_ord.get_cache(  # noqa: B020 (lm-eval's idiom)
                        req_str=request_str, cxt_toks=ctx_tokens, cont_toks=cont_toks, logits=logits):
                    cont_toks = torch.tensor(cont_toks, dtype=torch.long, device=self.device).unsqueeze(0)
                    max_equal = (greedy_tokens[:, -cont_toks.shape[1]:] == cont_toks).all()
                    ll = torch.gather(logits, 2, cont_toks.unsqueeze(-1)).squeeze(-1)
                    answer = (float(ll.sum()), bool(max_equal))
                    res.append(answer)
                    if request_str is not None:
                        self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return re_ord.get_original(res)
