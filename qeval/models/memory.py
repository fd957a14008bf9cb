"""Peak memory of a stage: CUDA max-allocated on GPU, this process's peak RSS on CPU (exact where
Linux can reset it, else sampled)."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import psutil


class PeakMemory:
    """Context manager; `.peak_bytes` after exit: CUDA max allocated on GPU; on CPU the exact peak
    RSS of the block where Linux lets a process reset its high-water mark (VmHWM, reset by writing
    5 to /proc/self/clear_refs), else RSS sampled every `interval` s by a thread (ru_maxrss is the
    whole process's lifetime peak and cannot be reset per stage; a sampler misses short peaks
    and is starved on a loaded machine)."""

    def __init__(self, device: str = "cpu", interval: float = 0.05):
        self.device, self.interval, self.peak_bytes = device, interval, 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._hwm = False

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
            return self
        self.peak_bytes = self._proc.memory_info().rss
        with _HWM_LOCK:
            now = _high_water()
            if now is not None and _reset_high_water():
                for outer in _HWM_ACTIVE:  # a nested block's reset must not lose the outer ones' peaks
                    outer.peak_bytes = max(outer.peak_bytes, now)
                self._hwm = True
                _HWM_ACTIVE.append(self)
                return self
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            self.peak_bytes = int(torch.cuda.max_memory_allocated())
        elif self._hwm:
            with _HWM_LOCK:
                self.peak_bytes = max(self.peak_bytes, _high_water() or 0, self._proc.memory_info().rss)
                _HWM_ACTIVE.remove(self)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)


_HWM_LOCK = threading.Lock()
_HWM_ACTIVE: list[PeakMemory] = []


def _high_water() -> int | None:
    """This process's peak RSS since the last reset (bytes), None where /proc has no VmHWM."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- per-phase peaks

def release_freed_heap() -> None:
    """Hand memory that Python / torch already freed back to the OS (glibc `malloc_trim`).

    With glibc's default settings freed blocks below its (self-raising) mmap threshold stay in the
    heap, so a peak sampled afterwards starts from an earlier high-water mark. The training child
    also sets ALLOCATOR (`tune_allocator`), which makes this mostly a no-op there."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim, RSS is what it is
        pass


def own_weights(model) -> int:
    """Copy a CPU model's float parameters (of a quantized model: embeddings, norms, an untied LM
    head) out of the safetensors file they were loaded from; returns how many were copied.

    transformers loads from a private memory map of the file. A 4-bit load reads every linear
    weight through that mapping to quantize it, and the float parameters that stay float are views
    into the same mapping, which keeps all of it alive: ~400 MiB of file pages of the embedded
    model's quantized-away fp32 weights stayed resident (counted in RSS, untouched by
    `malloc_trim`) for as long as the model lived. That, not the training, is why QLoRA measured
    above LoRA on CPU. With its own copies the mapping is unmapped and those pages leave RSS.
    (A float base is a view of the file until training touches its pages; the trainer copies it
    too, so every training base holds its weights the same way.) The values are unchanged. Quantized parameters (bitsandbytes' Params4bit /
    Int8Params, subclasses of Parameter) are the model's own memory already and are skipped."""
    import torch

    copied = 0
    with torch.no_grad():
        for p in model.parameters():
            if type(p) is torch.nn.Parameter:
                p.data = p.data.clone()
                copied += p.numel()
        copies: dict[int, torch.Tensor] = {}  # a buffer shared by several modules stays shared
        for mod in model.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and type(buf) is torch.Tensor:
                    mod._buffers[name] = copies.setdefault(id(buf), buf.clone())
    return copied


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# A measuring process's allocator: every block of 1 MiB or more is its own mapping, unmapped when
# freed; free heap above 1 MiB at the top is returned; two arenas. glibc's default raises the mmap
# threshold after each large free (up to 32 MiB), so freed activations and load buffers stay in
# fragmented heap and RSS shows the high-water mark of the allocator instead of what is live.
ALLOCATOR = {"mmap_threshold": 1 << 20, "trim_threshold": 1 << 20, "arena_max": 2}


def tune_allocator() -> bool:
    """Set ALLOCATOR with glibc's `mallopt` in this process (the training child calls it first
    thing); False where the C library is not glibc (then RSS includes the allocator's slack)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    global _tuned
    _tuned = all(mallopt(opt, val) == 1 for opt, val in ((_M_MMAP_THRESHOLD, ALLOCATOR["mmap_threshold"]),
                                                         (_M_TRIM_THRESHOLD, ALLOCATOR["trim_threshold"]),
                                                         (_M_ARENA_MAX, ALLOCATOR["arena_max"])))
    return _tuned


_tuned = False


def allocator_tuned() -> bool:
    """Whether this process runs with ALLOCATOR (a measuring child) or glibc's defaults."""
    return _tuned


class PhasePeaks:
    """Peak memory per phase of one process (`load`, `train`...): CUDA max allocated reset at each
    phase start; on CPU, freed heap is released first, then the RSS is sampled through the phase.

    `start[phase]` is the memory at the phase's start, `peak[phase]` its peak (bytes)."""

    def __init__(self, device: str = "cpu", interval: float = 0.02):
        self.device, self.interval = device, interval
        self.start: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)


class _Phase:
    def __init__(self, owner: PhasePeaks, name: str):
        self.owner, self.name = owner, name

    def __enter__(self):
        o = self.owner
        if o.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            o.start[self.name] = int(torch.cuda.memory_allocated())
        else:
            import gc

            gc.collect()
            release_freed_heap()
            self._pm = PeakMemory("cpu", o.interval).__enter__()
            o.start[self.name] = self._pm.peak_bytes
        return self

    def __exit__(self, *exc) -> None:
        o = self.owner
        if o.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            o.peak[self.name] = int(torch.cuda.max_memory_allocated())
        else:
            self._pm.__exit__(*exc)
            o.peak[self.name] = self._pm.peak_bytes


# ----------------------------------------------------------------------------- analytic model

GIB = 2**30
# Bytes per weight of a training base's quantized linear layers come from the format registry
# (`QuantFormat.memory_bits`; NF4's block constants, QLoRA paper section 3, are in qeval/quant/bnb.py).
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
    from qeval.quant.formats import FORMATS # imports torch: only when an estimate is made

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
