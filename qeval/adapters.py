"""Stage: fine-tune an adapter (one LoRA trainer; QLoRA = LoRA on a 4-bit base), attach or merge it.

`finetune(model, spec, device)` loads its own base at `spec.train_quant`, trains, and saves the
result under the cache keyed by a content hash (model fingerprint + spec + training-data hash +
library versions), so one adapter is trained once and reused by every arm that evaluates it.
`attach(loaded, artifact, merge)` puts an adapter on an already-loaded base, optionally merging it:
`dequantized` merges into the dequantized float base (exactly the unmerged numbers), `requantized`
then quantizes the merged weights back to the base's 4-bit format (the deploy path that can lose
the fine-tune).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qeval import env
from qeval.errors import ChildError, QevalError
from qeval.memory import PeakMemory
from qeval.models import LoadedModel, ResolvedModel, fingerprint, load_model
from qeval.quant import FORMATS, measure_footprint
from qeval.files import atomic_write, content_key
from qeval.suite_data import ensure_built, suite_data_dir

log = logging.getLogger("qeval")

TRAIN_DATA = {"lee_background": "lee_train.jsonl"}  # name -> data file built by qeval.suite_data
# The tasks each training set adapts to; every other task is "untouched" and measures forgetting.
DOMAIN_TASKS = {"lee_background": ("qeval_lee_ppl",)}
METHODS = ("lora", "full")
MERGES = ("none", "dequantized", "requantized")
ADAPTER_SCHEMA = 2  # 2: peak training memory measured in a fresh process


@dataclass(frozen=True)
class AdapterSpec:
    """How to fine-tune. QLoRA is `method: lora` with `train_quant: bnb-nf4-dq`."""

    method: str = "lora"  # lora | full (full fine-tune: the reference arm, float base only)
    train_quant: str = "none"  # precision of the base during training
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"  # every linear layer of the blocks (QLoRA paper)
    lr: float = 2e-4  # LoRA's usual rate; a full fine-tune wants ~1e-5
    steps: int = 30  # CPU default: minutes; raise on a GPU
    batch_size: int = 4
    seq_len: int = 128  # CPU default; 512+ on a GPU
    warmup_steps: int = 3
    seed: int = 1234
    train_data: str = "lee_background"
    gradient_checkpointing: bool = True  # trades ~40% more time for far less activation memory
    eval_every: int = 5  # held-out loss every N steps

    def problems(self, where: str) -> list[QevalError]:
        from qeval.errors import unknown_name

        out = []
        if self.method not in METHODS:
            out.append(unknown_name(f"{where}.method", self.method, METHODS))
        if self.train_quant not in FORMATS:
            out.append(unknown_name(f"{where}.train_quant", self.train_quant, FORMATS))
        elif self.method == "full" and self.train_quant != "none":
            out.append(QevalError(f"{where}.train_quant", self.train_quant,
                                  "'none' for a full fine-tune (quantized weights cannot be trained)",
                                  "use method: lora for a quantized base (QLoRA)"))
        if self.train_data not in TRAIN_DATA:
            out.append(unknown_name(f"{where}.train_data", self.train_data, TRAIN_DATA))
        for name in ("r", "alpha", "steps", "batch_size", "seq_len", "eval_every"):
            if getattr(self, name) < 1:
                out.append(QevalError(f"{where}.{name}", getattr(self, name), "a positive integer"))
        if not 0 <= self.dropout < 1:
            out.append(QevalError(f"{where}.dropout", self.dropout, "a value in [0, 1)"))
        if not self.lr > 0:
            out.append(QevalError(f"{where}.lr", self.lr, "a positive learning rate"))
        return out


@dataclass(frozen=True)
class AdapterArtifact:
    """A trained adapter (or fully fine-tuned model) on disk, with what training it cost."""

    key: str
    path: Path
    spec: AdapterSpec
    trainable_params: int
    total_params: int
    adapter_bytes: int  # bytes of the saved weights (LoRA: the adapter alone)
    train_s: float
    s_per_step: float
    tokens_per_s: float
    peak_train_bytes: int  # CUDA max allocated, or sampled peak RSS of the training process on CPU
    idle_bytes: int  # CPU: RSS of that process before loading the base (Python + libraries); 0 on CUDA
    losses: tuple[tuple[int, float], ...]  # (step, training loss)
    heldout: tuple[tuple[int, float], ...]  # (step, held-out loss)
    device: str
    reused: bool = False

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d.pop("reused")
        return d


def adapter_key(model: ResolvedModel, spec: AdapterSpec, device: str) -> str:
    """Content hash of what determines an adapter (the training data must be built already)."""
    data = suite_data_dir() / TRAIN_DATA[spec.train_data]
    from qeval.suite_data import sha256

    versions = {k: v for k, v in env.versions().items() if k in ("torch", "transformers", "peft", "bitsandbytes")}
    return content_key({"schema": ADAPTER_SCHEMA, "model": model.fingerprint, "spec": dataclasses.asdict(spec),
                        "data": sha256(data), "versions": versions,
                        "device": "cuda" if device.startswith("cuda") else "cpu"})


def finetune(model: ResolvedModel, spec: AdapterSpec, device: str, prefix: str = "",
             isolate: bool = True) -> AdapterArtifact:
    """Train `spec` on `model` (or reuse the stored artifact with the same key).

    With `isolate` (the default) training runs in a fresh process: its peak memory is then the
    training's own, not the high-water mark of whatever this process loaded before (RSS never
    shrinks back on CPU), and the memory is returned to the OS when it ends.
    """
    ensure_built()
    key = adapter_key(model, spec, device)
    out = env.cache_dir() / "adapters" / key[:32]
    meta = out / "qeval-artifact.json"
    if meta.is_file():
        return _load_artifact(meta, reused=True)
    if isolate:
        run_in_child(_train, (model, spec, device, key, out, prefix))
    else:
        _train(model, spec, device, key, out, prefix)
    return _load_artifact(meta, reused=False)


def run_in_child(fn: Callable, args: tuple) -> None:
    """Run `fn(*args)` in a fresh (spawned) process and re-raise its error here.

    A pool would hang the parent forever when the child dies (OOM killer, kill -9) or when its
    error cannot be unpickled; a plain Process with a pipe lets us watch both the result and the
    child's exit code. QevalErrors cross intact (they pickle); anything else arrives as ChildError
    with its type name and message."""
    import multiprocessing

    # spawn, not fork: a forked child would inherit this process's memory and threads
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args, os.getpid()))
    proc.start()
    send.close()  # only the child holds the writing end: EOF on recv means it is gone
    try:
        while not recv.poll(0.5):
            if not proc.is_alive() and not recv.poll(0.5):
                raise ChildError("ChildProcessDied", f"the training process exited with code {proc.exitcode} "
                                 "before reporting (killed, or out of memory?)")
        try:
            ok, error = recv.recv()
        except EOFError:
            proc.join(5)
            raise ChildError("ChildProcessDied", f"the training process exited with code {proc.exitcode} "
                             "before reporting (killed, or out of memory?)") from None
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if not ok:
        raise error


def _child_main(send, fn: Callable, args: tuple, parent_pid: int) -> None:
    import traceback

    _exit_with_parent(parent_pid)
    try:
        fn(*args)
        result = (True, None)
    except QevalError as e:
        result = (False, e)
    except BaseException as e:  # noqa: BLE001 -- everything must reach the parent as a value
        result = (False, ChildError(type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "",
                                    traceback.format_exc()))
    send.send(result)
    send.close()


def _exit_with_parent(parent_pid: int) -> None:
    """A parent killed with -9 cannot stop its child: without this, a training process would go on
    burning the CPU (and writing the cache) for minutes after its run was killed."""
    import threading

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="qeval-exit-with-parent").start()


def _train(model: ResolvedModel, spec: AdapterSpec, device: str, key: str, out: Path, prefix: str) -> None:
    """The one training loop (LoRA, QLoRA and full fine-tune alike); writes the artifact folder."""
    import sys

    import torch

    def progress(msg: str) -> None:
        print(f"{prefix}{msg}", file=sys.stderr, flush=True)

    torch.manual_seed(spec.seed)
    with PeakMemory(device) as peak:  # from before the load: the base's weights count too
        rss_before = peak.peak_bytes
        base = load_model(model, FORMATS.get(spec.train_quant), device)
        net = _trainable(base.model, spec)
        params = [p for p in net.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in net.parameters())
        train_blocks, heldout_blocks = _blocks(base.tokenizer, spec)
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, spec.warmup_steps)))
        gen = torch.Generator().manual_seed(spec.seed)
        order = torch.randperm(len(train_blocks), generator=gen)
        losses, heldout = [], [(0, _heldout_loss(net, heldout_blocks, device))]
        progress(f"fine-tune {spec.method} on {spec.train_quant}: {trainable:,} trainable of {total:,} parameters, "
                 f"{spec.steps} steps x {spec.batch_size} x {spec.seq_len} tokens; held-out loss {heldout[0][1]:.4f}")
        net.train()
        t0 = time.perf_counter()
        for step in range(1, spec.steps + 1):
            idx = [order[((step - 1) * spec.batch_size + i) % len(order)].item() for i in range(spec.batch_size)]
            batch = train_blocks[idx].to(device)
            loss = net(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append((step, float(loss.detach())))
            if step % spec.eval_every == 0 or step == spec.steps:
                heldout.append((step, _heldout_loss(net, heldout_blocks, device)))
                progress(f"  step {step}/{spec.steps}: loss {losses[-1][1]:.4f}, held-out {heldout[-1][1]:.4f}")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=out.parent))
    net.save_pretrained(tmp)  # LoRA: adapter_config.json + adapter_model.safetensors (lora_ tensors only)
    if spec.method == "full":
        base.tokenizer.save_pretrained(tmp)
    weights = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    art = AdapterArtifact(key, out, spec, trainable, total, weights, train_s, train_s / spec.steps,
                          spec.steps * spec.batch_size * spec.seq_len / train_s, peak.peak_bytes,
                          0 if device.startswith("cuda") else rss_before,
                          tuple(losses), tuple(heldout), device)
    atomic_write(tmp / "qeval-artifact.json", json.dumps(art.summary(), indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a crash mid-training leaves nothing that looks finished


def _load_artifact(meta: Path, reused: bool) -> AdapterArtifact:
    d = json.loads(meta.read_text())
    spec = d.pop("spec")
    if isinstance(spec.get("target_modules"), list):
        spec["target_modules"] = tuple(spec["target_modules"])
    d["losses"] = tuple(tuple(x) for x in d["losses"])
    d["heldout"] = tuple(tuple(x) for x in d["heldout"])
    return AdapterArtifact(**{**d, "path": meta.parent, "spec": AdapterSpec(**spec), "reused": reused})


def _trainable(model: Any, spec: AdapterSpec) -> Any:
    """Freeze the base and add LoRA, or unfreeze everything for a full fine-tune.

    For a k-bit base this does what peft's prepare_model_for_kbit_training does that training
    needs (frozen base, input grads for checkpointing) but not its upcast of every non-quantized
    parameter to float32, which on a bf16 GPU base doubles the embedding's memory for nothing.
    """
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the KV cache is useless in training and fights checkpointing
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if spec.gradient_checkpointing:
        model.enable_input_require_grads()
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                     task_type="CAUSAL_LM",
                     target_modules=list(spec.target_modules) if isinstance(spec.target_modules, tuple) else spec.target_modules)
    return get_peft_model(model, cfg)


def _blocks(tokenizer, spec: AdapterSpec):
    """Pack the training documents (EOS-separated) into seq_len blocks; same for held-out."""
    import torch

    rows = [json.loads(x) for x in (suite_data_dir() / TRAIN_DATA[spec.train_data]).read_text(encoding="utf-8").splitlines() if x]

    def pack(split: str):
        ids: list[int] = []
        for r in rows:
            if r["split"] == split:
                ids += tokenizer(r["text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        n = len(ids) // spec.seq_len
        return torch.tensor(ids[: n * spec.seq_len], dtype=torch.long).view(n, spec.seq_len)

    train, heldout = pack("train"), pack("heldout")
    if len(train) == 0 or len(heldout) == 0:
        raise QevalError("seq_len", spec.seq_len, "shorter than the training text", "lower seq_len")
    return train, heldout[:16]  # 16 held-out blocks (2,048 tokens at 128) keep each pass to seconds on CPU


def _heldout_loss(model, blocks, device: str) -> float:
    import torch

    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), 8):
            b = blocks[i:i + 8].to(device)
            total += float(model(input_ids=b, labels=b).loss) * len(b)
    model.train(was_training)
    return total / len(blocks)


def attach(loaded: LoadedModel, artifact: AdapterArtifact, merge: str = "none") -> LoadedModel:
    """Put a LoRA adapter on `loaded` (unmerged), or merge it (see module docstring)."""
    import torch
    from peft import PeftModel

    if artifact.spec.method != "lora":
        raise QevalError("adapter", artifact.spec.method, "a LoRA adapter to attach",
                         "a full fine-tune is evaluated with load_finetuned()")
    t0 = time.perf_counter()
    model = loaded.model
    fmt = loaded.fmt
    if merge in ("dequantized", "requantized"):
        if not _is_4bit(model):
            raise QevalError("merge", merge, "a 4-bit base to dequantize", "merge only QLoRA arms on bnb 4-bit formats")
        model = dequantize_4bit(model, getattr(torch, loaded.dtype))
        fmt = FORMATS.get("none")
    model = PeftModel.from_pretrained(model, str(artifact.path), is_trainable=False)
    if merge != "none":
        model = model.merge_and_unload()
    model.eval()
    attached = dataclasses.replace(loaded, model=model, fmt=fmt, footprint=measure_footprint(model, fmt),
                                   load_s=loaded.load_s + time.perf_counter() - t0)
    if merge == "requantized":
        return _requantize(attached, loaded)
    return attached


def _requantize(merged: LoadedModel, original: LoadedModel) -> LoadedModel:
    """Save the merged float model and load it back at the original 4-bit format."""
    with tempfile.TemporaryDirectory(prefix="qeval-merged-") as tmp:
        t0 = time.perf_counter()
        merged.model.save_pretrained(tmp)
        merged.tokenizer.save_pretrained(tmp)
        resolved = ResolvedModel(f"{original.resolved.spec}+merged", Path(tmp), fingerprint(Path(tmp)), "merged")
        out = load_model(resolved, original.fmt, original.device)
    return dataclasses.replace(out, resolved=original.resolved,
                               load_s=merged.load_s + time.perf_counter() - t0)


def load_finetuned(model: ResolvedModel, artifact: AdapterArtifact, fmt_name: str, device: str) -> LoadedModel:
    """A fully fine-tuned model is a folder of float weights: load it like any model."""
    ft = ResolvedModel(f"{model.spec}+{artifact.spec.method}", artifact.path, fingerprint(artifact.path), "finetuned")
    loaded = load_model(ft, FORMATS.get(fmt_name), device)
    return dataclasses.replace(loaded, resolved=model)


def _is_4bit(model) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def dequantize_4bit(model, dtype):
    """Replace every bitsandbytes Linear4bit by a float Linear holding its dequantized weights."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                if getattr(child.weight.quant_state, "packing_format_for_cpu", False):
                    raise QevalError("4-bit layer", name, "bitsandbytes' portable weight layout",
                                     "load it with qeval.models.load_model (it keeps that layout)")
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(dtype)
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      dtype=dtype, device=w.device)
                lin.weight.data.copy_(w)
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias.data.to(dtype))
                setattr(parent, name, lin)
    # transformers remembers the model was loaded quantized and would refuse to save it
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_quantized"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
