"""The training loss, chunked over tokens so the full batch's fp32 logits never exist at once
(`AdapterSpec.cross_entropy`; memory modeled by qeval.train.estimate.logits_bytes).

full: the model's own loss (transformers: logits for the whole batch, upcast to fp32).
chunked:N: torchtune's CEWithChunkedOutputLoss as it runs compiled: the LM head's logits are kept in
    the compute dtype, one chunk of tokens at a time is upcast, and backward keeps only the logits
    and each token's log-sum-exp (`_ChunkCE` recomputes the softmax, as the compiled graph does).
fused:N: the LM head and the loss per chunk, recomputed in backward (torchtune's
    LinearCrossEntropyLoss, Liger's fused linear cross-entropy): one chunk's logits at a time.
Both chunked losses are the sum of per-token losses over the chunks divided by the count of loss
tokens: the model's mean, up to float rounding.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qeval.data.train_data import IGNORE
from qeval.train.estimate import parse_cross_entropy


class _ChunkCE(torch.autograd.Function):
    """Summed cross-entropy of one chunk of logits, upcast to fp32 inside; saves the logits in their
    own dtype and the log-sum-exp (fp32, one per token), not the fp32 log-softmax."""

    @staticmethod
    def forward(ctx, logits, targets):
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        keep = targets != IGNORE
        picked = x.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, targets, lse)
        return ((lse - picked) * keep).sum()

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        p = (logits.float() - lse.unsqueeze(-1)).exp_()  # softmax, fp32, this chunk only
        p.scatter_add_(-1, targets.clamp_min(0).unsqueeze(-1), -torch.ones_like(lse).unsqueeze(-1))
        p.mul_((targets != IGNORE).unsqueeze(-1) * grad)
        return p.to(logits.dtype), None


def _fused_chunk(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def causal_lm_loss(net: Any, ids: torch.Tensor, labels: torch.Tensor, cross_entropy: str) -> torch.Tensor:
    """The next-token loss of `net` (a causal LM, peft-wrapped or not) on `ids`, mean over the tokens
    whose label is not IGNORE, computed as `cross_entropy` says."""
    mode, n = parse_cross_entropy(cross_entropy)
    if mode == "full":
        return net(input_ids=ids, labels=labels).loss
    lm = net.get_base_model() if hasattr(net, "get_base_model") else net
    hidden = lm.model(input_ids=ids).last_hidden_state[:, :-1]  # position t predicts token t + 1
    targets = labels[:, 1:]
    count = (targets != IGNORE).sum().clamp_min(1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.chunk(n, dim=1), targets.chunk(n, dim=1)):
        if mode == "chunked":
            total = total + _ChunkCE.apply(lm.lm_head(h), t)
        elif torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_fused_chunk, lm.lm_head, h, t, use_reentrant=False)
        else:
            total = total + _fused_chunk(lm.lm_head, h, t)
    return total / count


def loss_problem(model: Any) -> str | None:
    """Why a chunked loss can not replace this model's own (its logits are not lm_head(hidden))."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return f"{cfg.model_type} transforms its logits after the LM head"
    return None
