"""Peak memory of a stage: CUDA max-allocated on GPU, this process's peak RSS on CPU (exact where
Linux can reset it, else sampled)."""
from __future__ import annotations

import threading
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
            now = high_water()
            if now is not None and reset_high_water():
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
                self.peak_bytes = max(self.peak_bytes, high_water() or 0, self._proc.memory_info().rss)
                _HWM_ACTIVE.remove(self)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._proc.memory_info().rss)


_HWM_LOCK = threading.Lock()
_HWM_ACTIVE: list[PeakMemory] = []


def high_water() -> int | None:
    """This process's peak RSS since the last reset (bytes), None where /proc has no VmHWM."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_high_water() -> bool:
    """Reset this process's peak RSS to its current RSS; True only where the reset took effect.

    Some sandboxes accept the write to clear_refs and ignore it (CI's did: VmHWM stayed at the
    process's lifetime peak), so the reset is checked: afterwards VmHWM must be close to RSS.
    Where it is not, callers fall back to sampling."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
    except OSError:
        return False
    after = high_water()
    # RSS may grow between the two reads (other threads); 16 MiB is far below any peak we report
    return after is not None and after <= psutil.Process().memory_info().rss + _RESET_SLACK


_RESET_SLACK = 16 * 2**20


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


def _mallopt():
    """glibc's `mallopt`, or None where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def allocator_tunable() -> bool:
    """Whether this process could be given ALLOCATOR (glibc), without changing anything."""
    return _mallopt() is not None


def tune_allocator() -> bool:
    """Set ALLOCATOR with glibc's `mallopt` in this process (the training child calls it first
    thing); False where the C library is not glibc (then RSS includes the allocator's slack)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    global _tuned
    _tuned = all(mallopt(opt, val) == 1 for opt, val in ((_M_MMAP_THRESHOLD, ALLOCATOR["mmap_threshold"]),
                                                         (_M_TRIM_THRESHOLD, ALLOCATOR["trim_threshold"]),
                                                         (_M_ARENA_MAX, ALLOCATOR["arena_max"])))
    return _tuned


_tuned = _relaxed = False


def allocator_tuned() -> bool:
    """Whether this process runs with ALLOCATOR (a measuring child) or glibc's defaults."""
    return _tuned


def allocator_description() -> str:
    """The allocator this process runs with now, as records and tables state it."""
    if _relaxed:
        return "glibc mallopt " + ", ".join(f"{k} {v}" for k, v in RELAXED.items()) + " (relaxed after measuring)"
    return "glibc mallopt " + ", ".join(f"{k} {v}" for k, v in ALLOCATOR.items()) if _tuned else "default"


# After the measured window: the largest mmap threshold glibc's own dynamic rule reaches (32 MiB on
# 64-bit) and its trim threshold at that point (twice it): what an untuned process settles at.
RELAXED = {"mmap_threshold": 32 << 20, "trim_threshold": 64 << 20}


def relax_allocator() -> bool:
    """Back to glibc-like thresholds once nothing more is measured: ALLOCATOR maps and unmaps every
    block of 1 MiB or more, so each of them is page-faulted in afresh; on the 2-core CPU that made a
    training step 1.2-1.7x slower and a no-grad forward ~2x (`qeval bench --train`). False where
    mallopt is unavailable or the allocator was never tuned."""
    global _tuned, _relaxed
    mallopt = _mallopt()
    if not _tuned or mallopt is None:
        return False
    _relaxed = all(mallopt(opt, val) == 1 for opt, val in ((_M_MMAP_THRESHOLD, RELAXED["mmap_threshold"]),
                                                           (_M_TRIM_THRESHOLD, RELAXED["trim_threshold"])))
    _tuned = not _relaxed
    return _relaxed


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
        self.stop()

    def stop(self) -> None:
        """End the measurement here (the phase's peak is what was seen so far); the rest of the
        `with` block runs unmeasured. Idempotent."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        o = self.owner
        if o.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            o.peak[self.name] = int(torch.cuda.max_memory_allocated())
        else:
            self._pm.__exit__(None, None, None)
            o.peak[self.name] = self._pm.peak_bytes
