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

    def lora_params(self, r: int, targets: str | tuple[str, ...] = "all-linear") -> int:
        """LoRA parameters at rank `r` on `targets` (LINEARS' short names, or every linear layer)."""
        return sum(self.lora_tensors(r, targets))

    def lora_tensors(self, r: int, targets: str | tuple[str, ...] = "all-linear") -> list[int]:
        """Sizes of the LoRA tensors (A: in x r, B: r x out) of every layer (optimizer states are per tensor)."""
        pick = LINEARS if targets == "all-linear" else targets
        return [n for name, (a, b) in zip(LINEARS, self.linears()) if name in pick for n in (a * r, r * b)] * self.layers

    def tensors(self) -> list[int]:
        """Sizes of every weight tensor: the blocks' linears, the embeddings (and LM head unless tied), the norms."""
        return ([x * y for x, y in self.linears()] * self.layers + [self.vocab * self.hidden] * (1 if self.tied else 2)
                + [self.hidden] * (2 * self.layers + 1))


LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # Shape.linears() order; hub names are these + "_proj"
CROSS_ENTROPY = ("full", "chunked", "fused")
CHECKPOINTING = ("layer", "none")
# name -> (state bits: None = AdamW's two states in the parameter's dtype, else bitsandbytes' states of
# that many bits; the class qeval's trainer steps)
OPTIMIZERS = {"adamw": (None, "torch.optim.AdamW"), "adamw8bit": (8, "bitsandbytes.optim.AdamW8bit"),
              "paged_adamw": (32, "bitsandbytes.optim.PagedAdamW"),
              "paged_adamw8bit": (8, "bitsandbytes.optim.PagedAdamW8bit")}
# bitsandbytes (0.50 optim/optimizer.py): a tensor under MIN_8BIT elements keeps 32-bit states; an
# 8-bit state has one fp32 absmax per BNB_BLOCK elements; only tensors of MIN_PAGED elements or more
# are paged (smaller ones stay in device memory even with a paged optimizer)
MIN_8BIT, BNB_BLOCK, MIN_PAGED = 4096, 256, 100_000


def parse_cross_entropy(value: str) -> tuple[str, int]:
    """`full` | `chunked:N` | `fused:N` (N chunks of tokens, default 8) -> (mode, N); QevalError otherwise."""
    mode, _, n = str(value).partition(":")
    if mode in CROSS_ENTROPY and (mode == "full" and not n or mode != "full" and (not n or n.isdigit() and int(n) > 0)):
        return mode, int(n or (1 if mode == "full" else 8))
    from qeval.core.errors import QevalError

    raise QevalError("cross_entropy", value, "full, chunked:N or fused:N (N > 0 chunks of tokens)",
                     "e.g. chunked:8 (torchtune's CEWithChunkedOutputLoss)")


@dataclass(frozen=True)
class Options:
    """A trainer's memory choices, as `estimate` models them. `Options()` is qeval's trainer today."""

    checkpointing: str = "layer"  # layer: each block's input kept, one block recomputed | none
    cross_entropy: str = "full"  # full | chunked:N | fused:N (logits_bytes)
    offload: bool = False  # activation offloading: the kept activations live in host memory
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw | paged_adamw8bit (bitsandbytes)
    optimizer_in_backward: bool = False  # full fine-tune: each gradient applied and freed in backward
    adapter_dtype: str = "fp32"  # fp32 (peft) | compute (torchtune: LoRA weights, grads and states in bf16)
    full_weights: str = "fp32"  # a full fine-tune's trained weights: fp32 master | compute (torchtune)
    lora_targets: str | tuple[str, ...] = "all-linear"  # or a tuple of LINEARS

    def states(self, sizes: list[int], param_bytes: int) -> tuple[int, int]:
        """Optimizer state bytes for trainable tensors of these sizes: (in device memory, paged).
        torch's AdamW keeps two states of the parameter's dtype; bitsandbytes' two fp32 states, or
        two uint8 + their absmax for a tensor of MIN_8BIT elements or more (8-bit)."""
        bits = OPTIMIZERS[self.optimizer][0]
        # two fp32 quantization maps of 256 values, shared by every 8-bit tensor, on the device
        device = 2 * 256 * 4 if bits == 8 and any(n >= MIN_8BIT for n in sizes) else 0
        paged = 0
        for n in sizes:
            absmax = 0
            if bits is None:
                b = 2 * n * param_bytes
            elif bits == 8 and n >= MIN_8BIT:
                b, absmax = 2 * n, 2 * 4 * -(-n // BNB_BLOCK)  # the absmax stays in device memory, paged or not
            else:
                b = 2 * n * 4
            if self.optimizer.startswith("paged") and n >= MIN_PAGED:
                paged += b
            else:
                device += b
            device += absmax
        return device, paged

    def describe(self, method: str = "lora") -> str:
        """The options that matter for `method` (lora | qlora | full), in words."""
        targets = self.lora_targets if self.lora_targets == "all-linear" else ",".join(self.lora_targets)
        trained = (f"weights in {self.full_weights}" if method == "full"
                   else f"LoRA on {targets} in {self.adapter_dtype}")
        return (f"checkpointing {self.checkpointing}, cross-entropy {self.cross_entropy}, "
                f"offload {'on' if self.offload else 'off'}, optimizer {self.optimizer}"
                f"{' in backward' if self.optimizer_in_backward else ''}, {trained}")

    def problems(self) -> list[str]:
        out = []
        try:
            parse_cross_entropy(self.cross_entropy)
        except Exception as e:  # noqa: BLE001 -- QevalError, reported with the rest
            out.append(str(e))
        if self.checkpointing not in CHECKPOINTING:
            out.append(f"checkpointing {self.checkpointing!r}: expected one of {', '.join(CHECKPOINTING)}")
        if self.optimizer not in OPTIMIZERS:
            out.append(f"optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.lora_targets != "all-linear" and (not self.lora_targets or set(self.lora_targets) - set(LINEARS)):
            out.append(f"LoRA targets {self.lora_targets!r}: expected all-linear or some of {', '.join(LINEARS)}")
        return out


# What each trainer does, per method. torchtune: the recipes behind its README's memory table
# (commit 30b8519e8, 2024-09-24: llama3_1/8B_{lora,qlora,full}_single_device.yaml, with the table's
# compile=True, batch 2, packed to 2,048): bf16 everywhere, activation checkpointing per layer, no
# offloading, CEWithChunkedOutputLoss (8 chunks), torch AdamW (fused) for LoRA / QLoRA, LoRA rank 8
# on q, v (LoRA) or q, k, v, o + MLP (QLoRA, torchao NF4: block 64, scalers int8 per 256 = bnb NF4 +
# double quant within 0.001 bit per weight), and for the full fine-tune bitsandbytes' PagedAdamW8bit
# stepped in backward on bf16 weights.
TRAINERS: dict[str, dict[str, Options]] = {
    "qeval": {m: Options() for m in ("lora", "qlora", "full")},
    "torchtune": {
        "lora": Options(cross_entropy="chunked:8", adapter_dtype="compute", lora_targets=("q", "v")),
        "qlora": Options(cross_entropy="chunked:8", adapter_dtype="compute"),
        "full": Options(cross_entropy="chunked:8", optimizer="paged_adamw8bit", optimizer_in_backward=True,
                        full_weights="compute"),
    },
}
TRAINER_RANK = {"qeval": 16, "torchtune": 8}


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak training memory (bytes), by part."""

    method: str  # lora | qlora | full
    weights: int
    adapter_optimizer: int  # trainable weights + optimizer states on the device
    gradients: int
    activations: int
    overhead: int  # the process's own (CPU: Python + libraries; CUDA: context)
    paged: int = 0  # paged optimizer states: CUDA unified memory, outside the allocator's peak, evicted under pressure

    @property
    def total(self) -> int:
        return self.weights + self.adapter_optimizer + self.gradients + self.activations + self.overhead


def _held_bytes(fmt: str, in_features: int, float_bytes: int) -> float:
    """Bytes one linear weight of a `fmt` base takes in memory (the format registry's `memory_bits`:
    packed formats at their theory, simulated ones at what they hold)."""
    return FORMATS.get(fmt).memory_bits(in_features, 8 * float_bytes) / 8


def logits_bytes(cross_entropy: str, tokens: int, vocab: int, b: int) -> int:
    """Peak bytes of the LM head's logits and the loss over `tokens` tokens (compute dtype `b` bytes).

    full (the model's own loss; qeval's default): the logits, their fp32 upcast and its gradient,
    and below fp32 that gradient cast back to the compute dtype, all at once. chunked:N (torchtune's
    CEWithChunkedOutputLoss, compiled): the logits are kept in compute dtype for the whole batch,
    one chunk of tokens at a time is upcast (fp32 upcast + its gradient). fused:N (the projection
    and the loss per chunk, recomputed in backward: torchtune's LinearCrossEntropyLoss, Liger): one
    chunk's logits, upcast, gradient and its cast back, never the whole batch's.

    The cast-back term was measured on an H200 (bf16, Gemma-3-270M's shape, 2 x 2,048 tokens,
    262k vocabulary): the model's own loss held 12.0 bytes per logit (2 + 4 + 4 + 2), the fused
    loss's chunk likewise; the chunked loss fitted without it (docs/adapters-and-memory.md)."""
    mode, n = parse_cross_entropy(cross_entropy)
    chunk = -(-tokens // n)
    back = b if b < 4 else 0  # the fp32 gradient cast back to a 16-bit compute dtype
    if mode == "full":
        return tokens * vocab * (b + 4 + 4 + back)
    if mode == "chunked":
        return tokens * vocab * b + chunk * vocab * (4 + 4)
    return chunk * vocab * (b + 4 + 4 + back)


def estimate(shape: Shape, method: str, batch: int, seq_len: int, *, r: int = 16, dtype_bytes: int = 2,
             train_quant: str = "bnb-nf4-dq", checkpointing: bool = True, overhead: int = 0,
             heldout_batch: int = 0, options: Options | None = None) -> MemoryEstimate:
    """Peak training memory of LoRA (on the `dtype_bytes` base), QLoRA (on `train_quant`, any format of
    the registry: bitsandbytes, torchao, quanto, simulated GGUF...) or a
    full fine-tune (fp32 master weights: AdamW on bf16 weights rounds most updates away).

    `options` are the trainer's memory choices (`Options`; default: qeval's trainer with
    `checkpointing`). Activations, per token: with gradient checkpointing each block keeps its input
    (hidden) and one block is recomputed at a time in backward (~ 6 hidden + 2 kv + 5 intermediate
    values, SwiGLU, attention without stored scores: SDPA); without it every block keeps that much;
    offloading moves the kept tensors to host memory (two layers' worth in flight). The LM head adds
    `logits_bytes`. With the model's own loss ("full", today's default) the logits term is added
    to the recomputed block (conservative, and what every recorded prediction used); with a chunked or
    fused loss the larger of the two counts: the logits' backward is over before the last block is
    recomputed.

    `heldout_batch` > 0: the trainer also runs held-out loss passes of that many sequences without
    gradients; the peak is the larger of a training step and such a pass (its logits -- per chunk
    with a chunked loss --, their fp32 upcast unless already fp32, and the log-softmax the loss
    keeps). `overhead` is added as given: on CPU the trainer passes what it measured (the runtime's
    RSS before loading, and what the load left besides the model), never a fitted constant."""
    o = options or Options(checkpointing="layer" if checkpointing else "none")
    b = dtype_bytes
    tokens = batch * seq_len
    if method == "full":
        wb = 4 if o.full_weights == "fp32" else b  # fp32 master weights, or the compute dtype (torchtune)
        weights = shape.params * wb
        state, paged = o.states(shape.tensors(), wb)
        opt, grads = state, shape.params * wb
        if o.optimizer_in_backward:  # each gradient is applied and freed as backward produces it
            grads = max(shape.vocab * shape.hidden, max(x * y for x, y in shape.linears())) * wb
    else:
        weights = int(shape.layers * sum(x * y * _held_bytes(train_quant if method == "qlora" else "none", x, b)
                                         for x, y in shape.linears()) + shape.other_params * b)
        trainable = shape.lora_params(r, o.lora_targets)
        ab = 4 if o.adapter_dtype == "fp32" else b  # peft keeps LoRA weights in fp32; torchtune in bf16
        state, paged = o.states(shape.lora_tensors(r, o.lora_targets), ab)
        opt, grads = trainable * ab + state, trainable * ab
    kv = shape.kv_heads * shape.head_dim
    per_block = 6 * shape.hidden + 2 * kv + 5 * shape.intermediate
    kept = shape.hidden if o.checkpointing == "layer" else per_block  # what each block keeps per token
    stored = tokens * (min(shape.layers, 2) if o.offload else shape.layers) * kept * b
    block = tokens * per_block * b if o.checkpointing == "layer" else 0
    logits = logits_bytes(o.cross_entropy, tokens, shape.vocab, b)
    act = stored + (block + logits if parse_cross_entropy(o.cross_entropy)[0] == "full" else max(block, logits))
    if method == "qlora" and _held_bytes(train_quant, shape.hidden, b) < b:
        # a low-bit layer is dequantized for its matmul: the largest one, transient
        act += max(x * y for x, y in shape.linears()) * b
    if heldout_batch:
        upcast = 4 if b != 4 else 0
        mode, n = parse_cross_entropy(o.cross_entropy)
        held = heldout_batch * seq_len
        act = max(act, -(-held // (1 if mode == "full" else n)) * shape.vocab * (b + upcast + 4)
                  + held * 2 * shape.hidden * b)
    return MemoryEstimate(method, int(weights), int(opt), int(grads), int(act), int(overhead), int(paged))


def fits_table(shape: Shape, gpu_gib: float, batch: int, seq_len: int, r: int = 16,
               options: dict[str, Options] | None = None) -> list[dict]:
    """LoRA / QLoRA / full fine-tune on a CUDA GPU of `gpu_gib` GiB (bf16 compute; `options` per
    method, default qeval's trainer): predicted peak by part and whether it fits (with CUDA_CONTEXT
    on top). `allocator_gib` is the peak without the context: what torch.cuda.max_memory_allocated
    (and torchtune's logged peak) counts."""
    rows = []
    for method in ("lora", "qlora", "full"):
        e = estimate(shape, method, batch, seq_len, r=r, dtype_bytes=2, overhead=CUDA_CONTEXT,
                     options=(options or {}).get(method))
        rows.append({"method": method, "weights_gib": e.weights / GIB, "adapter_optimizer_gib": e.adapter_optimizer / GIB,
                     "gradients_gib": e.gradients / GIB, "activations_gib": e.activations / GIB,
                     "total_gib": e.total / GIB, "allocator_gib": (e.total - CUDA_CONTEXT) / GIB,
                     "paged_gib": e.paged / GIB, "fits": e.total <= gpu_gib * GIB})
    return rows
