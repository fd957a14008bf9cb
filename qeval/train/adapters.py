"""Stage: fine-tune an adapter (one LoRA trainer; QLoRA = LoRA on a 4-bit base), attach or merge it.

`finetune(model, spec, device)` loads its own base at `spec.train_quant`, trains, and saves the
result under the cache keyed by a content hash (model fingerprint + spec + training-data hash +
library versions), so one adapter is trained once and reused by every arm that evaluates it.
`attach(loaded, artifact, merge)` puts an adapter on an already-loaded base, optionally merging it:
`dequantized` merges into the dequantized float base (exactly the unmerged numbers), `requantized`
then quantizes the merged weights back to the base's format with the same backend (the deploy path
that can lose the fine-tune). A base qualifies when its backend declares LoRA support
(`QuantFormat.lora_trainable`: bitsandbytes 4-bit, torchao int8, quanto, GGUF, HQQ).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qeval.core import env
from qeval.core.console import forward_to, say
from qeval.core.errors import ChildError, QevalError
from qeval.models.memory import ALLOCATOR, PhasePeaks, allocator_tuned, own_weights, tune_allocator
from qeval.models.load import LoadedModel, ResolvedModel, fingerprint, load_model
from qeval.quant.formats import FORMATS, measure_footprint
from qeval.core.files import atomic_write, content_key

log = logging.getLogger("qeval")

METHODS = ("lora", "full")
MERGES = ("none", "dequantized", "requantized")
# 3: user training data (content hash in the key), labels masked per format, budgets in tokens,
#    early stopping, peft passthrough, time per step without the held-out passes
ADAPTER_SCHEMA = 3
# LoraConfig fields a plan may not set through `peft:` (the spec's own keys, or qeval's to decide)
PEFT_OWN = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}
PEFT_INTERNAL = ("task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode")
# not converged: held-out loss still fell by more than CONVERGED_TOL (relative) over the last
# CONVERGED_EVALS held-out evaluations
CONVERGED_EVALS, CONVERGED_TOL = 3, 0.01
HELDOUT_BATCH = 8  # sequences per held-out loss pass (no gradients; part of the training phase's peak)


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
    steps: int = 30  # CPU default: minutes; raise on a GPU. Ignored when budget_tokens is set
    budget_tokens: int = 0  # > 0: train on this many tokens (steps = ceil(tokens / (batch_size x seq_len)))
    batch_size: int = 4
    seq_len: int = 128  # CPU default; 512+ on a GPU
    warmup_steps: int = 3
    seed: int = 1234
    train_data: str = "lee_background"  # a built-in name (qeval.data.train_data.BUILTIN) or a .jsonl file / folder
    packing: str = "pack"  # pack | truncate: what happens to rows longer than seq_len (qeval.data.train_data)
    gradient_checkpointing: bool = True  # trades ~40% more time for far less activation memory
    eval_every: int = 5  # held-out loss every N steps
    early_stopping_patience: int = 0  # > 0: stop after this many held-out evaluations without a new best
    domain_tasks: tuple[str, ...] = ()  # the tasks this training targets; every other task measures forgetting
    seeds: tuple[int, ...] = ()  # train each arm once per seed (replaces `seed`): the verdict then carries the spread
    peft: dict = dataclasses.field(default_factory=dict)  # more LoraConfig options (use_dora, init_lora_weights...)

    @property
    def train_steps(self) -> int:
        """Optimizer steps: from the token budget when one is given."""
        if self.budget_tokens > 0:
            return -(-self.budget_tokens // (self.batch_size * self.seq_len))
        return self.steps

    def identity(self) -> dict:
        """What determines the trained weights (the adapter's and its cells' keys): everything but
        `domain_tasks`, which only says how the results are read."""
        d = dataclasses.asdict(self)
        d.pop("domain_tasks")
        return d

    def problems(self, where: str) -> list[QevalError]:
        from qeval.core.errors import unknown_name
        from qeval.data.train_data import PACKINGS, read_rows, resolve

        out = []
        if self.method not in METHODS:
            out.append(unknown_name(f"{where}.method", self.method, METHODS))
        if self.train_quant not in FORMATS:
            out.append(unknown_name(f"{where}.train_quant", self.train_quant, FORMATS))
        elif self.method == "full" and self.train_quant != "none":
            out.append(QevalError(f"{where}.train_quant", self.train_quant,
                                  "'none' for a full fine-tune (quantized weights cannot be trained)",
                                  "use method: lora for a quantized base (QLoRA)"))
        elif problem := lora_base_problem(self.train_quant, f"{where}.train_quant"):
            out.append(problem)
        try:  # the data is read and checked now, before any model loads
            read_rows(resolve(self.train_data, f"{where}.train_data"))
        except QevalError as e:
            out += getattr(e, "errors", [e])
        if self.packing not in PACKINGS:
            out.append(unknown_name(f"{where}.packing", self.packing, PACKINGS))
        for name in ("r", "alpha", "steps", "batch_size", "seq_len", "eval_every"):
            if getattr(self, name) < 1:
                out.append(QevalError(f"{where}.{name}", getattr(self, name), "a positive integer"))
        for name in ("budget_tokens", "early_stopping_patience", "warmup_steps"):
            if getattr(self, name) < 0:
                out.append(QevalError(f"{where}.{name}", getattr(self, name), "0 (off) or a positive integer"))
        if not 0 <= self.dropout < 1:
            out.append(QevalError(f"{where}.dropout", self.dropout, "a value in [0, 1)"))
        if not self.lr > 0:
            out.append(QevalError(f"{where}.lr", self.lr, "a positive learning rate"))
        if len(set(self.seeds)) != len(self.seeds) or any(x < 0 for x in self.seeds):
            out.append(QevalError(f"{where}.seeds", list(self.seeds), "distinct seeds, 0 or more"))
        if self.peft:
            if self.method != "lora":
                out.append(QevalError(f"{where}.peft", sorted(self.peft), "no peft options for method: full",
                                      "remove peft:, or use method: lora"))
            else:
                out += peft_problems(self, where)
        return out

    def domain_problems(self, where: str, tasks: list[str]) -> list[QevalError]:
        """`domain_tasks` must name tasks of the suite."""
        from qeval.core.errors import unknown_name

        return [unknown_name(f"{where}.domain_tasks task", t, tasks, "a task of the plan's suite")
                for t in self.domain_tasks if t not in tasks]


SEED_TAG = "#s"  # an arm trained with seed 7 from adapter `lora` is `lora#s7` (arm and adapter names)


def seed_base(name: str) -> str:
    """The plan's name of a seed-expanded arm or adapter label (`lora#s7@merged-float` -> `lora@merged-float`)."""
    import re

    return re.sub(re.escape(SEED_TAG) + r"\d+", "", str(name))


def expand_seeds(adapters: dict[str, AdapterSpec], arms: list) -> tuple[dict[str, AdapterSpec], list]:
    """An adapter with `seeds: [a, b]` becomes adapters `name#sa`, `name#sb` (each its own `seed`),
    and every arm using it one arm per seed: several trainings per arm, the spread in the report."""
    out = {}
    for name, spec in adapters.items():
        if spec.seeds:
            for sd in spec.seeds:
                out[f"{name}{SEED_TAG}{sd}"] = dataclasses.replace(spec, seed=sd, seeds=())
        else:
            out[name] = spec
    new_arms = []
    for arm in arms:
        spec = adapters.get(arm.adapter) if getattr(arm, "adapter", None) else None
        if spec is not None and spec.seeds:
            new_arms += [dataclasses.replace(arm, name=f"{arm.name}{SEED_TAG}{sd}", adapter=f"{arm.adapter}{SEED_TAG}{sd}")
                         for sd in spec.seeds]
        else:
            new_arms.append(arm)
    return out, new_arms


def lora_config(spec: AdapterSpec) -> Any:
    """The peft LoraConfig of a spec: its own keys, plus the `peft:` passthrough."""
    from peft import LoraConfig

    target = list(spec.target_modules) if isinstance(spec.target_modules, tuple) else spec.target_modules
    kwargs = {"bias": "none", **spec.peft}
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, task_type="CAUSAL_LM",
                      target_modules=target, **kwargs)


def peft_problems(spec: AdapterSpec, where: str) -> list[QevalError]:
    """Check `peft:` against peft's own LoraConfig: its field names (did-you-mean), the literal
    values it declares (init_lora_weights), then LoraConfig's own checks."""
    import typing

    from peft import LoraConfig

    from qeval.core.errors import unknown_name

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    allowed = [n for n in fields if n not in PEFT_OWN and n not in PEFT_INTERNAL]
    out = []
    for k, v in spec.peft.items():
        if k in PEFT_OWN:
            out.append(QevalError(f"{where}.peft.{k}", v, f"the spec's own key {PEFT_OWN[k]!r}",
                                  f"set `{PEFT_OWN[k]}:` instead of peft.{k}"))
        elif k in PEFT_INTERNAL:
            out.append(QevalError(f"{where}.peft.{k}", v, "a training option (qeval sets this one)", "remove it"))
        elif k not in fields:
            out.append(unknown_name(f"{where}.peft key (a peft LoraConfig field)", k, allowed))
    if out:
        return out
    init = spec.peft.get("init_lora_weights")
    if isinstance(init, str):
        hint = typing.get_type_hints(LoraConfig).get("init_lora_weights")
        literals = [a for arg in typing.get_args(hint) for a in typing.get_args(arg) if isinstance(a, str)]
        ok = init in literals or any(x.endswith("]") and init.startswith(x.split("[")[0]) for x in literals)
        if literals and not ok:
            out.append(unknown_name(f"{where}.peft.init_lora_weights", init, literals, "or true / false"))
    if init == "loftq" and spec.train_quant != "none":
        out.append(QevalError(f"{where}.peft.init_lora_weights", init, "a float base (train_quant: none): "
                              "LoftQ initialises from the full-precision weights",
                              "train LoftQ on train_quant: none and evaluate it on the 4-bit arm"))
    if not out:
        try:
            lora_config(spec)
        except (ValueError, TypeError) as e:
            out.append(QevalError(f"{where}.peft", spec.peft, f"options peft's LoraConfig accepts ({str(e).splitlines()[0]})"))
    return out


def not_converged(heldout: list | tuple) -> bool:
    """True when the held-out loss was still falling by more than CONVERGED_TOL (relative) over the
    last CONVERGED_EVALS evaluations: more budget would likely have helped."""
    losses = [float(x[1]) for x in heldout]
    if len(losses) <= CONVERGED_EVALS:
        return len(losses) > 1 and losses[-1] < losses[0] * (1 - CONVERGED_TOL)
    then = losses[-1 - CONVERGED_EVALS]
    return then > 0 and (then - losses[-1]) / then > CONVERGED_TOL


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
    peak_train_bytes: int  # training steps only (not the load): CUDA max allocated, or peak RSS on CPU
    idle_bytes: int  # CPU: RSS of that process before loading the base (Python + libraries); 0 on CUDA
    losses: tuple[tuple[int, float], ...]  # (step, training loss)
    heldout: tuple[tuple[int, float], ...]  # (step, held-out loss)
    device: str
    steps_done: int = 0  # fewer than spec.train_steps when early stopping stopped it
    tokens: int = 0  # tokens the optimizer saw (steps_done x batch_size x seq_len, padding included)
    order_hash: str = ""  # sha256 of the token blocks in the order trained: equal means the same tokens
    eval_s: float = 0.0  # held-out passes (not part of train_s, s_per_step, tokens_per_s)
    data: dict = dataclasses.field(default_factory=dict)  # qeval.data.train_data.prepare's summary
    memory: dict = dataclasses.field(default_factory=dict)  # per phase, by part, and the analytic prediction
    reused: bool = False

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d.pop("reused")
        return d


def adapter_key(model: ResolvedModel, spec: AdapterSpec, device: str) -> str:
    """Content hash of what determines an adapter: model, recipe, the training data's content
    (not its path), library versions and device kind."""
    from qeval.data.train_data import resolve

    versions = {k: v for k, v in env.versions().items() if k in ("torch", "transformers", "peft", "bitsandbytes")}
    recipe = spec.identity()
    src = resolve(spec.train_data)
    if not src.builtin:  # the same rows moved elsewhere are the same adapter
        recipe["train_data"] = "local"
    material = {"schema": ADAPTER_SCHEMA, "model": model.fingerprint, "spec": recipe, "data": src.hash,
                "versions": versions, "device": "cuda" if device.startswith("cuda") else "cpu"}
    fmt = FORMATS.get(spec.train_quant)
    if fmt.options or fmt.packages:  # a backend base (torchao, quanto, gguf): its options and package versions
        from qeval.models.load import compute_dtype

        material["base_format"] = fmt.spec(compute_dtype(device))  # (bnb presets: keys unchanged)
    return content_key(material)


def finetune(model: ResolvedModel, spec: AdapterSpec, device: str, prefix: str = "",
             isolate: bool = True) -> AdapterArtifact:
    """Train `spec` on `model` (or reuse the stored artifact with the same key).

    With `isolate` (the default) training runs in a fresh process: its peak memory is then the
    training's own, not the high-water mark of whatever this process loaded before (RSS never
    shrinks back on CPU), and the memory is returned to the OS when it ends.
    """
    key = adapter_key(model, spec, device)
    out = env.cache_dir() / "adapters" / key[:32]
    meta = out / "qeval-artifact.json"
    reused = meta.is_file()
    if not reused:
        if isolate:
            run_in_child(_train, (model, spec, device, key, out, prefix))
        else:
            _train(model, spec, device, key, out, prefix)
    # the weights are keyed by spec.identity(); how the results are read (domain_tasks) is this run's
    return dataclasses.replace(_load_artifact(meta, reused=reused), spec=spec)


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
        while True:
            while not recv.poll(0.5):
                if not proc.is_alive() and not recv.poll(0.5):
                    raise ChildError("ChildProcessDied", f"the training process exited with code {proc.exitcode} "
                                     "before reporting (killed, or out of memory?)")
            try:
                message = recv.recv()
            except EOFError:
                proc.join(5)
                raise ChildError("ChildProcessDied", f"the training process exited with code {proc.exitcode} "
                                 "before reporting (killed, or out of memory?)") from None
            if message[0] != "line":
                break
            say(message[1])  # the child's progress line, printed here (its own stderr is the log)
        ok, error = message
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
    forward_to(lambda line: send.send(("line", line)))  # qeval's lines to the parent's console
    tune_allocator()  # freed memory goes back to the OS: RSS is what the child holds (qeval.models.memory)
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
    import torch

    def progress(msg: str) -> None:
        say(f"{prefix}{msg}")

    import hashlib

    import psutil

    from qeval.data.train_data import prepare

    if spec.peft.get("init_lora_weights") == "loftq" and not device.startswith("cuda"):
        raise QevalError("peft.init_lora_weights", "loftq", "a CUDA device (peft computes the LoftQ "
                         "initialisation on the GPU)", "run this adapter with device: cuda, or drop LoftQ on CPU")
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
        net = _trainable(base.model, spec)
        params = [p for p in net.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in net.parameters())
        train, held, data = prepare(spec.train_data, base.tokenizer, spec.seq_len, spec.packing)
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, spec.warmup_steps)))
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
            value = _heldout_loss(net, held, device)
            eval_s += time.perf_counter() - t
            return value

        long_note = (f"{data['long_rows']} rows longer than seq_len {'packed across blocks' if spec.packing == 'pack' else 'truncated'}"
                     if data["long_rows"] else "no row longer than seq_len")
        progress(f"fine-tune {spec.method} on {spec.train_quant}: {trainable:,} trainable of {total:,} parameters, "
                 f"{steps} steps x {spec.batch_size} x {spec.seq_len} = {steps * spec.batch_size * spec.seq_len:,} tokens "
                 f"of {data['format']} data ({data['train_rows']} train / {data['heldout_rows']} held-out rows, "
                 f"{spec.packing}: {long_note})")
    # Training's own peak, measured apart from the load (on CUDA max allocated is reset here). On
    # CPU the base holds no view of the weights file (qeval.models.memory.own_weights: the views kept a
    # 4-bit load's quantized-away float weights resident, and QLoRA's peak came out above LoRA's)
    # and this process's allocator returns freed blocks (qeval.models.memory.tune_allocator).
    with phases.phase("train"):
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
            loss = net(input_ids=ids.to(device), labels=labels.to(device)).loss
            loss.backward()
            if step == 1:
                grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append((step, float(loss.detach())))
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
    opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t))
    memory = _memory_breakdown(base, spec, phases, idle, min(HELDOUT_BATCH, len(held.ids)), trainable_bytes=sum(p.numel() * p.element_size() for p in params),
                               opt_bytes=opt_bytes, grad_bytes=grad_bytes, cuda=cuda)
    art = AdapterArtifact(key, out, spec, trainable, total, weights, train_s, train_s / done,
                          tokens / train_s, phases.peak["train"], idle,
                          tuple(losses), tuple(heldout), device, steps_done=done, tokens=tokens,
                          order_hash=order_hash.hexdigest(), eval_s=eval_s, data=data, memory=memory)
    atomic_write(tmp / "qeval-artifact.json", json.dumps(art.summary(), indent=1))
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
                      grad_bytes: int, cuda: bool) -> dict:
    """Measured parts of the training peak and the analytic model's prediction (qeval.models.memory.estimate).

    weights = the loaded model's bytes; adapter_optimizer = trainable weights + AdamW states;
    gradients = the trainable gradients; activations = what is left of the training peak (held-out
    passes included; on CPU also what allocator slack remains, and for a 4-bit base the
    dequantized weight of the layer in flight)."""
    from qeval.models.memory import Shape, estimate

    weights = int(base.footprint.total_bytes)
    if spec.method == "full":
        trainable_bytes = 0  # the trained weights are the model's: counted once, in `weights`
    peak = phases.peak["train"]
    measured = {"idle": idle, "load_peak": phases.peak["load"], "train_start": phases.start["train"], "train_peak": peak,
                "weights": weights, "adapter_optimizer": trainable_bytes + opt_bytes, "gradients": grad_bytes,
                "allocator": ("glibc mallopt " + ", ".join(f"{k} {v}" for k, v in ALLOCATOR.items())
                              if allocator_tuned() else "default")}
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
        e = estimate(shape, method, spec.batch_size, spec.seq_len, r=spec.r, dtype_bytes=dtype_bytes,
                     train_quant=spec.train_quant if method == "qlora" else "bnb-nf4-dq",
                     checkpointing=spec.gradient_checkpointing, overhead=runtime + process,
                     heldout_batch=heldout_batch)
        measured["predicted"] = {**dataclasses.asdict(e), "total": e.total}
        measured["prediction_error"] = (e.total - peak) / peak if peak else None
    except Exception as exc:  # noqa: BLE001 -- a config the model does not cover: no prediction, say why
        measured["predicted"] = {"error": str(exc)[:200]}
    return measured


def _load_artifact(meta: Path, reused: bool) -> AdapterArtifact:
    d = json.loads(meta.read_text())
    spec = d.pop("spec")
    if isinstance(spec.get("target_modules"), list):
        spec["target_modules"] = tuple(spec["target_modules"])
    d["losses"] = tuple(tuple(x) for x in d["losses"])
    d["heldout"] = tuple(tuple(x) for x in d["heldout"])
    for name in ("domain_tasks", "seeds"):
        if isinstance(spec.get(name), list):
            spec[name] = tuple(spec[name])
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
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if spec.gradient_checkpointing:
        model.enable_input_require_grads()
    config = lora_config(spec)
    hqq = [n for n, m in model.named_modules() if type(m).__name__ == "HQQLinear"]
    if hqq and config.target_modules == "all-linear":
        # peft's "all-linear" finds nn.Linear subclasses only; hqq's layers (every linear but the
        # head, see qeval.quant.quantizable_linears) are the same set, named explicitly
        from qeval.quant.formats import quantizable_linears

        config.target_modules = set(hqq) | {n for n, _ in quantizable_linears(model)}
    return get_peft_model(model, config)


def _heldout_loss(model, blocks, device: str) -> float:
    """Mean loss per loss token over the held-out blocks (masked labels do not count)."""
    import torch

    from qeval.data.train_data import IGNORE

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks.ids), HELDOUT_BATCH):
            ids, labels = blocks.ids[i:i + HELDOUT_BATCH].to(device), blocks.labels[i:i + HELDOUT_BATCH].to(device)
            n = int((labels[:, 1:] != IGNORE).sum())  # the model shifts labels by one
            if n:
                total += float(model(input_ids=ids, labels=labels).loss) * n
                count += n
    model.train(was_training)
    return total / max(count, 1)


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
        if problem := merge_problem(loaded.fmt.name, "merge"):
            raise problem
        model = dequantize_base(model, getattr(torch, loaded.dtype))
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
    """Save the merged float model and load it back at the original format (the same backend
    quantizes it again: bitsandbytes at load, torchao / quanto / GGUF after it)."""
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


def lora_base_problem(fmt_name: str, where: str) -> QevalError | None:
    """Why a LoRA adapter can not train on (or be attached to) `fmt_name`; None when its backend
    declares LoRA support (`QuantFormat.lora_trainable`)."""
    fmt = FORMATS.get(fmt_name)
    if fmt.lora_trainable:
        return None
    return QevalError(where, fmt_name, f"a base whose backend declares LoRA training ({fmt.backend} does not "
                      f"for this format: {fmt.storage or fmt.description})",
                      "use one that does, e.g. bnb-nf4-dq, torchao:int8-wo, quanto:int4, gguf:q4_0 (qeval formats)")


def merge_problem(fmt_name: str, where: str) -> QevalError | None:
    """Why a LoRA adapter on `fmt_name` can not be merged (dequantized or re-quantized); None when it
    can: a quantized base with LoRA support, except bitsandbytes' LLM.int8 (no dequantize path here)."""
    fmt = FORMATS.get(fmt_name)
    if fmt.name != "none" and fmt.lora_trainable and not (fmt.backend == "bitsandbytes" and "int8" in fmt.name):
        return None
    return QevalError(where, fmt_name, "a quantized base with LoRA support to dequantize, merge into and re-quantize "
                      "(bnb 4-bit, torchao int8, quanto, GGUF, HQQ)", "merge paths exist for QLoRA-style arms on those bases")


def _is_4bit(model) -> bool:
    return any(type(m).__name__ == "Linear4bit" for m in model.modules())


def dequantize_base(model, dtype):
    """Replace every quantized linear layer by a float Linear holding its dequantized weights:
    bitsandbytes Linear4bit, torchao tensor-subclass weights (Int8Tensor, ...), quanto QLinear, hqq HQQLinear. GGUF's
    simulated weights already are float and stay as they are. Returns the (same) model."""
    import torch

    from qeval.quant.formats import _is_subclass_tensor

    if _is_4bit(model):
        model = dequantize_4bit(model, dtype)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "HQQLinear":  # hqq: packed codes + scale/zero in its meta
                setattr(parent, name, _hqq_to_linear(child, dtype))
                continue
            w = getattr(child, "weight", None)
            if not isinstance(child, torch.nn.Linear) or not _is_subclass_tensor(w):
                continue
            lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  dtype=dtype, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(w.dequantize().to(dtype))
                if child.bias is not None:
                    lin.bias.copy_(child.bias.detach().to(dtype))
            setattr(parent, name, lin)
    return model


def _hqq_to_linear(layer, dtype):
    """A float Linear holding an hqq HQQLinear's dequantized weight (hqq's own dequantize)."""
    import torch

    w = layer.dequantize()
    lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype,
                          device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w.to(dtype))
        if layer.bias is not None:
            lin.bias.copy_(layer.bias.detach().to(dtype))
    return lin


def dequantize_4bit(model, dtype):
    """Replace every bitsandbytes Linear4bit by a float Linear holding its dequantized weights."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                if getattr(child.weight.quant_state, "packing_format_for_cpu", False):
                    raise QevalError("4-bit layer", name, "bitsandbytes' portable weight layout",
                                     "load it with qeval.models.load.load_model (it keeps that layout)")
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
