"""Stage: fine-tune an adapter (one LoRA trainer; QLoRA = LoRA on a quantized base).

`finetune(model, spec, device)` loads its own base at `spec.train_quant`, trains, and saves the
result under the cache keyed by a content hash (model fingerprint + spec + training-data hash +
library versions: `qeval.train.spec.adapter_key`), so one adapter is trained once and reused by
every arm that evaluates it. A base qualifies when its backend declares LoRA support
(`QuantFormat.lora_trainable`); LoRA's "all-linear" targets are the backend's when it names them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from qeval.core import env
from qeval.core.console import say
from qeval.core.errors import QevalError
from qeval.core.files import atomic_write
from qeval.models.load import ResolvedModel, load_model
from qeval.models.memory import PhasePeaks, allocator_description, allocator_tuned, own_weights, relax_allocator
from qeval.quant.backend import backend_of
from qeval.quant.formats import FORMATS
from qeval.train.artifact import AdapterArtifact, artifact_ready, load_artifact, seal_artifact
from qeval.train.child import run_in_child
from qeval.train.spec import AdapterSpec, adapter_key, lora_config

HELDOUT_BATCH = 8  # sequences per held-out loss pass (no gradients; part of the training phase's peak)


def finetune(model: ResolvedModel, spec: AdapterSpec, device: str, prefix: str = "",
             isolate: bool = True) -> AdapterArtifact:
    """Train `spec` on `model` (or reuse the stored artifact with the same key).

    With `isolate` (the default) training runs in a fresh process: its peak memory is then the
    training's own, not the high-water mark of whatever this process loaded before (RSS never
    shrinks back on CPU), and the memory is returned to the OS when it ends.
    """
    key = adapter_key(model, spec, device)
    out = env.adapter_dir(key)
    meta = out / "qeval-artifact.json"
    reused = artifact_ready(out)  # a corrupt one is removed (one line) and trained again
    if not reused:
        if isolate:
            run_in_child(_train, (model, spec, device, key, out, prefix))
        else:
            _train(model, spec, device, key, out, prefix)
    # the weights are keyed by spec.identity(); how the results are read (domain_tasks) is this run's
    return dataclasses.replace(load_artifact(meta, reused=reused), spec=spec)


def _train(model: ResolvedModel, spec: AdapterSpec, device: str, key: str, out: Path, prefix: str) -> None:
    """The one training loop (LoRA, QLoRA and full fine-tune alike); writes the artifact folder."""
    import torch

    from qeval.train.loss import loss_problem  # torch at import: not for plan validation

    def progress(msg: str) -> None:
        say(f"{prefix}{msg}")

    import hashlib

    import psutil

    from qeval.data.train_data import prepare

    if problems := spec.device_problems("adapter", device):  # a plan refuses these before it runs
        raise problems[0]
    torch.manual_seed(spec.seed)
    phases = PhasePeaks(device)
    cuda = device.startswith("cuda")
    _import_training_libraries(model)
    idle = 0 if cuda else psutil.Process().memory_info().rss  # Python + libraries, before the model
    with phases.phase("load"):
        # A full fine-tune trains fp32 weights even on a bf16 GPU: AdamW's updates (lr x ~1) on bf16
        # weights (8 bits of mantissa) round most of them away. LoRA keeps the base in compute dtype.
        base = load_model(model, FORMATS.get(spec.train_quant), device,
                          dtype=torch.float32 if spec.method == "full" else None)
        if not cuda and base.fmt.name == "none":
            own_weights(base.model)  # not a view of the file: held like the 4-bit base's (qeval.models.memory)
        if spec.cross_entropy != "full" and (why := loss_problem(base.model)):
            raise QevalError("cross_entropy", spec.cross_entropy, f"a model whose logits are its LM head's ({why})",
                             "use cross_entropy: full for this model")
        ckpt = checkpointing(spec, base.model, device)
        net = trainable(base.model, spec, ckpt)
        params = [p for p in net.parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in net.parameters())
        train, held, data = prepare(spec.train_data, base.tokenizer, spec.seq_len, spec.packing)
        opt, sched = optimizer(params, spec)
        # The order depends on the seed and the number of blocks only: arms trained on the same data,
        # seq_len, packing and seed see the same tokens in the same order (order_hash proves it).
        gen = torch.Generator().manual_seed(spec.seed)
        order = torch.randperm(len(train.ids), generator=gen)
        steps = spec.train_steps
        eval_s = 0.0
        grad_bytes = 0

        def heldout_loss() -> float:
            nonlocal eval_s
            t = time.perf_counter()
            value = heldout_loss_of(net, held, device, spec.cross_entropy)
            eval_s += time.perf_counter() - t
            return value

        long_note = (f"{data['long_rows']} rows longer than seq_len {'packed across blocks' if spec.packing == 'pack' else 'truncated'}"
                     if data["long_rows"] else "no row longer than seq_len")
        progress(f"fine-tune {spec.method} on {spec.train_quant}: {n_trainable:,} trainable of {total:,} parameters, "
                 f"{steps} steps x {spec.batch_size} x {spec.seq_len} = {steps * spec.batch_size * spec.seq_len:,} tokens "
                 f"of {data['format']} data ({data['train_rows']} train / {data['heldout_rows']} held-out rows, "
                 f"{spec.packing}: {long_note})")
    # Training's own peak, measured apart from the load (on CUDA max allocated is reset here). On
    # CPU the base holds no view of the weights file (qeval.models.memory.own_weights: the views kept a
    # 4-bit load's quantized-away float weights resident, and QLoRA's peak came out above LoRA's)
    # and this process's allocator returns freed blocks (qeval.models.memory.tune_allocator).
    with phases.phase("train") as measuring:
        allocator, window = allocator_description(), 0  # window: steps measured, 0 = all of them
        losses, heldout = [], [(0, heldout_loss())]
        progress(f"  held-out loss before training {heldout[0][1]:.4f}")
        net.train()
        order_hash = hashlib.sha256()
        best, since_best, done = heldout[0][1], 0, 0
        t0, eval_before = time.perf_counter(), eval_s
        for step in range(1, steps + 1):
            idx = [order[((step - 1) * spec.batch_size + i) % len(order)].item() for i in range(spec.batch_size)]
            ids, labels = train.ids[idx], train.labels[idx]
            order_hash.update(ids.numpy().tobytes())
            order_hash.update(labels.numpy().tobytes())
            loss = train_step(net, params, opt, sched, ids.to(device), labels.to(device), spec.cross_entropy,
                              grads=(sizes := []) if step == 1 else None, offload=spec.offload_activations)
            if step == 1:
                grad_bytes = sum(sizes)
            losses.append((step, loss))
            done = step
            if step % spec.eval_every == 0 or step == steps:
                heldout.append((step, heldout_loss()))
                progress(f"  step {step}/{steps}: loss {losses[-1][1]:.4f}, held-out {heldout[-1][1]:.4f}")
                if heldout[-1][1] < best:
                    best, since_best = heldout[-1][1], 0
                else:
                    since_best += 1
                if spec.early_stopping_patience and since_best >= spec.early_stopping_patience and step < steps:
                    progress(f"  early stop at step {step}: no better held-out loss in {since_best} evaluations")
                    break
                if not window and not cuda and step < steps and allocator_tuned():
                    # Every allocation this training makes has now been made at least once (a step
                    # with the optimizer's states, a held-out pass): later steps repeat the same
                    # shapes. The peak is read here and the rest runs with glibc-like thresholds
                    # (qeval.models.memory.relax_allocator: the measuring allocator slows CPU steps 1.2-1.7x).
                    measuring.stop()
                    relax_allocator()
                    window = step
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        train_s = time.perf_counter() - t0 - (eval_s - eval_before)  # optimizer steps only, not held-out passes
    net.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=out.parent))
    net.save_pretrained(tmp)  # LoRA: adapter_config.json + adapter_model.safetensors (lora_ tensors only)
    if spec.method == "full":
        base.tokenizer.save_pretrained(tmp)
    weights = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    tokens = done * spec.batch_size * spec.seq_len
    # (bitsandbytes shares its quantization maps between tensors: each counted once)
    states = list({t.data_ptr(): t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}.values())
    # paged states (bitsandbytes) live in CUDA unified memory: outside the allocator's peak
    opt_bytes = sum(t.numel() * t.element_size() for t in states if not getattr(t, "is_paged", False))
    paged_bytes = sum(t.numel() * t.element_size() for t in states if getattr(t, "is_paged", False))
    if window:
        allocator += f" for the load and steps 0-{window} (peak read there), glibc-like after"
    memory = _memory_breakdown(base, spec, phases, idle, min(HELDOUT_BATCH, len(held.ids)), trainable_bytes=sum(p.numel() * p.element_size() for p in params),
                               opt_bytes=opt_bytes, grad_bytes=grad_bytes, cuda=cuda, ckpt=ckpt, allocator=allocator,
                               paged_bytes=paged_bytes)
    art = AdapterArtifact(key, out, spec, n_trainable, total, weights, train_s, train_s / done,
                          tokens / train_s, phases.peak["train"], idle,
                          tuple(losses), tuple(heldout), device, steps_done=done, tokens=tokens,
                          order_hash=order_hash.hexdigest(), eval_s=eval_s, data=data, memory=memory)
    atomic_write(tmp / "qeval-artifact.json", json.dumps(art.summary(), indent=1))
    seal_artifact(tmp)  # its files' hashes: a reuse checks them (qeval.train.artifact.artifact_ready)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a crash mid-training leaves nothing that looks finished


def _import_training_libraries(model: ResolvedModel) -> None:
    """Import what training will (transformers' class for this architecture, peft, bitsandbytes),
    so that the runtime's RSS measured before the load (`idle`) is the whole runtime's."""
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM

    with contextlib.suppress(Exception):  # an architecture transformers lacks fails in the load, clearly
        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(model.path))]
    for name in ("peft", "bitsandbytes"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def _memory_breakdown(base, spec: AdapterSpec, phases, idle: int, heldout_batch: int, trainable_bytes: int, opt_bytes: int,
                      grad_bytes: int, cuda: bool, ckpt: bool = True, allocator: str = "default",
                      paged_bytes: int = 0) -> dict:
    """Measured parts of the training peak and the analytic model's prediction (qeval.train.estimate).

    weights = the loaded model's bytes; adapter_optimizer = trainable weights + the optimizer's
    states in device memory (paged states, in CUDA unified memory and outside the peak: `paged`);
    gradients = the trainable gradients; activations = what is left of the training peak (held-out
    passes included; on CPU also what allocator slack remains, and for a 4-bit base the
    dequantized weight of the layer in flight)."""
    from qeval.train.estimate import Options, Shape, estimate

    weights = int(base.footprint.total_bytes)
    if spec.method == "full":
        trainable_bytes = 0  # the trained weights are the model's: counted once, in `weights`
    peak = phases.peak["train"]
    measured = {"idle": idle, "load_peak": phases.peak["load"], "train_start": phases.start["train"], "train_peak": peak,
                "weights": weights, "adapter_optimizer": trainable_bytes + opt_bytes, "gradients": grad_bytes,
                "allocator": allocator, "paged": paged_bytes}
    # CPU, both measured in this process: `runtime` = RSS after importing the training libraries,
    # before loading (Python, torch, transformers, peft, bitsandbytes); `process` = what the load
    # left besides the model (tokenizer, tokenized data, lazily built library state). Their sum is
    # the base the analytic model adds its parts to.
    runtime = 0 if cuda else idle
    process = 0 if cuda else max(0, phases.start["train"] - idle - weights - trainable_bytes)
    measured["runtime"], measured["process"] = runtime, process
    measured["activations"] = max(0, peak - weights - runtime - process - measured["adapter_optimizer"] - grad_bytes)
    method = "full" if spec.method == "full" else ("qlora" if spec.train_quant != "none" else "lora")
    try:
        shape = Shape.from_config(base.model.config.to_dict())
        dtype_bytes = 2 if cuda and str(base.dtype) in ("bfloat16", "float16") else 4
        options = Options(checkpointing="layer" if ckpt else "none", cross_entropy=spec.cross_entropy,
                          offload=spec.offload_activations, optimizer=spec.optimizer)
        auto = " (auto)" if spec.gradient_checkpointing == "auto" else ""
        measured["options"] = (f"checkpointing {options.checkpointing}{auto}, cross-entropy {options.cross_entropy}"
                               + (", offload on" if options.offload else "")
                               + (f", optimizer {options.optimizer}" if options.optimizer != "adamw" else ""))
        e = estimate(shape, method, spec.batch_size, spec.seq_len, r=spec.r, dtype_bytes=dtype_bytes,
                     train_quant=spec.train_quant if method == "qlora" else "bnb-nf4-dq",
                     overhead=runtime + process, heldout_batch=heldout_batch, options=options)
        measured["predicted"] = {**dataclasses.asdict(e), "total": e.total}
        measured["prediction_error"] = (e.total - peak) / peak if peak else None
    except Exception as exc:  # noqa: BLE001 -- a config the model does not cover: no prediction, say why
        measured["predicted"] = {"error": str(exc)[:200]}
    return measured


def trainable(model: Any, spec: AdapterSpec, ckpt: bool = True) -> Any:
    """Freeze the base and add LoRA, or unfreeze everything for a full fine-tune; `ckpt`: gradient
    checkpointing per layer (`checkpointing` resolves the spec's setting).

    For a k-bit base this does what peft's prepare_model_for_kbit_training does that training
    needs (frozen base, input grads for checkpointing) but not its upcast of every non-quantized
    parameter to float32, which on a bf16 GPU base doubles the embedding's memory for nothing.
    """
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the KV cache is useless in training and fights checkpointing
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if ckpt:
        model.enable_input_require_grads()
    config = lora_config(spec)
    backend = backend_of(FORMATS.get(spec.train_quant))
    if config.target_modules == "all-linear" and backend is not None and backend.lora_targets is not None:
        # peft's "all-linear" finds nn.Linear subclasses only: a backend whose layers are not one names them
        if (targets := backend.lora_targets(model)) is not None:
            config.target_modules = targets
    return get_peft_model(model, config)


def optimizer(params: list, spec: AdapterSpec) -> tuple:
    """The spec's AdamW (torch's, or bitsandbytes' 8-bit / paged one) and its linear warm-up, as
    every training of `spec` steps them."""
    import torch

    from qeval.train.estimate import OPTIMIZERS

    module, _, name = OPTIMIZERS[spec.optimizer][1].rpartition(".")
    opt = getattr(importlib.import_module(module), name)(params, lr=spec.lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, spec.warmup_steps)))


def train_step(net, params: list, opt, sched, ids, labels, cross_entropy: str, clock=None, grads=None,
               offload: bool = False) -> float:
    """One optimizer step on one batch; the step's loss. `clock(phase)` is called at the end of
    each phase (forward, backward, optimizer) for `qeval bench`'s split; `grads`, a list, receives
    the gradients' byte sizes before the optimizer frees them (the memory table's `gradients`);
    `offload`: what the forward keeps for backward is held in pinned host memory (CUDA)."""
    import torch

    from qeval.train.loss import causal_lm_loss

    tick = clock or (lambda phase: None)
    keep = torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext()
    with keep:
        loss = causal_lm_loss(net, ids, labels, cross_entropy)
    tick("forward")
    loss.backward()
    tick("backward")
    if grads is not None:
        grads += [p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    value = float(loss.detach())
    tick("optimizer")
    return value


# `gradient_checkpointing: auto` turns it on only when training without it would need more than this
# share of the device's memory (the analytic projection, qeval.train.estimate): a 135M model at
# 4 x 128 tokens needs well under 1 GiB of activations, and recomputing every block costs a forward
AUTO_CHECKPOINT_SHARE = 0.5


def checkpointing(spec: AdapterSpec, model: Any, device: str) -> bool:
    """Whether this training checkpoints per layer: the spec's true / false, or for `auto` whether
    the projected peak without it exceeds AUTO_CHECKPOINT_SHARE of the device's memory.

    Non-reentrant checkpointing recomputes each block with the RNG state of its first run
    (dropout masks included), so the trained weights do not depend on this setting
    (tests/test_adapters.py checks it bit for bit); only the peak memory and the time do."""
    if spec.gradient_checkpointing != "auto":
        return bool(spec.gradient_checkpointing)
    import psutil
    import torch

    from qeval.train.estimate import Options, Shape, estimate

    try:
        shape = Shape.from_config(model.config.to_dict())
    except Exception:  # noqa: BLE001 -- an architecture the projection does not cover: the safe side
        return True
    cuda = device.startswith("cuda")
    method = "full" if spec.method == "full" else ("qlora" if spec.train_quant != "none" else "lora")
    e = estimate(shape, method, spec.batch_size, spec.seq_len, r=spec.r,
                 dtype_bytes=2 if cuda and model.dtype in (torch.bfloat16, torch.float16) else 4,
                 train_quant=spec.train_quant if method == "qlora" else "bnb-nf4-dq",
                 options=Options(checkpointing="none", cross_entropy=spec.cross_entropy))
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory if cuda \
        else psutil.virtual_memory().total
    return e.total > AUTO_CHECKPOINT_SHARE * total


def heldout_loss_of(model, blocks, device: str, cross_entropy: str = "full") -> float:
    """Mean loss per loss token over the held-out blocks (masked labels do not count)."""
    import torch

    from qeval.train.loss import causal_lm_loss

    from qeval.data.train_data import IGNORE

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks.ids), HELDOUT_BATCH):
            ids, labels = blocks.ids[i:i + HELDOUT_BATCH].to(device), blocks.labels[i:i + HELDOUT_BATCH].to(device)
            n = int((labels[:, 1:] != IGNORE).sum())  # the model shifts labels by one
            if n:
                total += float(causal_lm_loss(model, ids, labels, cross_entropy)) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)
