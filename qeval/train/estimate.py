"""The analytic model of peak training memory: LoRA, QLoRA (on any format of the registry) and a full
fine-tune, by part, from a model's config alone (no torch: `qeval fits` and the report's memory
section use it without loading a model). What a training process really peaks at is measured in
qeval.models.memory; the trainer records both (qeval.train.recipe)."""
from __future__ import annotations

from dataclasses import dataclass

from qeval.quant.formats import FORMATS

GIB = 2**30
# Bytes per weight of a training base's quantized linear layers come from the format registry
# (`QuantFormat.memory_bits`; NF4's block constants, QLoRA paper section 3, are in qeval/quant/backends/bnb.py).
ADAM_BYTES = 8  # AdamW: two fp32 states per trainable parameter
CUDA_CONTEXT = 0.5 * GIB  # CUDA context + cuBLAS workspace, outside max_memory_allocated: added for fit


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's sizes, from a hub-style config.json (Llama, Mistral, Qwen, SmolLM...)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            from qeval.core.errors import QevalError

            raise QevalError("model config", ", ".join(missing), "a decoder config.json with vocab_size, hidden_size, "
                             "intermediate_size, num_hidden_layers, num_attention_heads",
                             "pass a Llama-style hub config.json")
        heads = cfg["num_attention_heads"]
        return cls(cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   bool(cfg.get("tie_word_embeddings", False)))

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one block's linear layers: q, k, v, o, gate, up, down."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (unless tied) and norms: never quantized by bitsandbytes."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        return self.layers * r * sum(a + b for a, b in self.linears())


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak training memory (bytes), by part."""

    method: str  # lora | qlora | full
    weights: int
    adapter_optimizer: int  # trainable weights + AdamW states
    gradients: int
    activations: int
    overhead: int  # the process's own (CPU: Python + libraries; CUDA: context)

    @property
    def total(self) -> int:
        return self.weights + self.adapter_optimizer + self.gradients + self.activations + self.overhead


def _held_bytes(fmt: str, in_features: int, float_bytes: int) -> float:
    """Bytes one linear weight of a `fmt` base takes in memory (the format registry's `memory_bits`:
    packed formats at their theory, simulated ones at what they hold)."""
    return FORMATS.get(fmt).memory_bits(in_features, 8 * float_bytes) / 8


def estimate(shape: Shape, method: str, batch: int, seq_len: int, *, r: int = 16, dtype_bytes: int = 2,
             train_quant: str = "bnb-nf4-dq", checkpointing: bool = True, overhead: int = 0,
             heldout_batch: int = 0) -> MemoryEstimate:
    """Peak training memory of LoRA (on the `dtype_bytes` base), QLoRA (on `train_quant`, any format of
    the registry: bitsandbytes, torchao, quanto, simulated GGUF...) or a
    full fine-tune (fp32 master weights: AdamW on bf16 weights rounds most updates away).

    Activations, per token: with gradient checkpointing each block keeps its input (hidden) and one
    block is recomputed at a time in backward (~ 6 hidden + 2 kv + 5 intermediate values, SwiGLU,
    attention without stored scores: SDPA); without it every block keeps that much. The LM head
    adds the logits three times (the logits, their fp32 upcast for the loss, its gradient).

    `heldout_batch` > 0: the trainer also runs held-out loss passes of that many sequences without
    gradients; the peak is the larger of a training step and such a pass (its logits, their fp32
    upcast unless already fp32, and the log-softmax the loss keeps). `overhead` is added as given:
    on CPU the trainer passes what it measured (the runtime's RSS before loading, and what the load
    left besides the model), never a fitted constant."""
    b = dtype_bytes
    tokens = batch * seq_len
    if method == "full":
        weights = shape.params * 4  # fp32 master weights
        trainable = shape.params
        opt, grads = trainable * ADAM_BYTES, trainable * 4
    else:
        weights = int(shape.layers * sum(x * y * _held_bytes(train_quant if method == "qlora" else "none", x, b)
                                         for x, y in shape.linears()) + shape.other_params * b)
        trainable = shape.lora_params(r)
        opt, grads = trainable * (4 + ADAM_BYTES), trainable * 4  # peft keeps LoRA weights in fp32
    kv = shape.kv_heads * shape.head_dim
    per_block = 6 * shape.hidden + 2 * kv + 5 * shape.intermediate
    if checkpointing:
        act = tokens * (shape.layers * shape.hidden + per_block) * b
    else:
        act = tokens * shape.layers * per_block * b
    if method == "qlora" and _held_bytes(train_quant, shape.hidden, b) < b:
        # a low-bit layer is dequantized for its matmul: the largest one, transient
        act += max(x * y for x, y in shape.linears()) * b
    act += tokens * shape.vocab * (b + 4 + 4)
    if heldout_batch:
        upcast = 4 if b != 4 else 0
        act = max(act, heldout_batch * seq_len * (shape.vocab * (b + upcast + 4) + 2 * shape.hidden * b))
    return MemoryEstimate(method, int(weights), int(opt), int(grads), int(act), int(overhead))


def fits_table(shape: Shape, gpu_gib: float, batch: int, seq_len: int, r: int = 16) -> list[dict]:
    """LoRA / QLoRA / full fine-tune on a CUDA GPU of `gpu_gib` GiB (bf16 compute, checkpointing):
    predicted peak by part and whether it fits (with CUDA_CONTEXT on top)."""
    rows = []
    for method in ("lora", "qlora", "full"):
        e = estimate(shape, method, batch, seq_len, r=r, dtype_bytes=2, overhead=CUDA_CONTEXT)
        rows.append({"method": method, "weights_gib": e.weights / GIB, "adapter_optimizer_gib": e.adapter_optimizer / GIB,
                     "gradients_gib": e.gradients / GIB, "activations_gib": e.activations / GIB,
                     "total_gib": e.total / GIB, "fits": e.total <= gpu_gib * GIB})
    return rows
