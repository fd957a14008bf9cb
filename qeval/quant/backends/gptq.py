"""GPTQ (Frantar et al. 2022), calibration-based, quantized by gptqmodel in an isolated venv: `gptq:w4:g64`.

gptqmodel cannot live in qeval's environment (7.7 wants torch 2.14 and CUDA wheels; its dependencies
would move torch / transformers), so it gets a venv of its own (`qeval setup --backend gptq` creates
it under the cache: torch 2.13 CPU pinned, gptqmodel GPTQ_VERSION) and quantizes in a child process
of that venv's Python (`gptq_child.py`): a serialisable job in (the float model folder, the
calibration token ids, the options), a gptqmodel checkpoint out. That checkpoint is cached under
`<cache>/gptq/<key>` keyed by the model fingerprint + options + calibration hash + the isolated
env's gptqmodel / torch / transformers versions, like adapters, so reruns and other arms reuse it.

qeval's environment never imports gptqmodel: it reads the checkpoint's packed tensors (qweight,
qzeros, scales, g_idx) and dequantizes them with its own unpacking (`dequantize`) into the float
model. Compute is therefore "simulated" (float weights holding exactly the GPTQ values; no GPTQ
CPU kernel here); the footprint records the checkpoint's packed bytes per layer (`packed_bytes`).

Calibration text comes from the plan (`calibration: {data, samples, seq_len}`, default: the offline
training corpus the adapters use); its content hash is part of the format's spec and so of every
cell key. A format looked up by name (`FORMATS.get("gptq:w4")`) calibrates on the default set; a
cell carries the plan's CalibrationSpec and gets its format from `calibrated(name, spec)`, so no
process-wide setting decides what a worker computes.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qeval.core import env
from qeval.core.errors import ChildError, QevalError
from qeval.core.files import atomic_write, content_key, fingerprint
from qeval.quant.backend import mark, marked_account
from qeval.quant.formats import BACKENDS, FORMATS, Backend, QuantFormat, bad_option, quantizable_linears

if TYPE_CHECKING:
    import torch

GPTQ_VERSION = "7.6.0"  # 7.7 requires torch 2.14 (CUDA wheels); 7.6 runs with torch 2.13 CPU
TORCH_PIN = "torch==2.13.0"  # installed first, so pip never swaps in a multi-GB CUDA build
PYTHON_ENV = "QEVAL_GPTQ_PYTHON"  # the isolated env's python, if not the cache's venv
BITS = {"w2": 2, "w4": 4, "w8": 8}  # bit widths whose codes pack evenly into int32 (w3 straddles words)
DEFAULT_GROUP = 128  # GPTQ checkpoints' usual group; SmolLM2-135M's 576-wide layers need g64 / g32 / g96 / g192
DAMP_PERCENT = 0.01  # Hessian damping (fraction of its mean diagonal), the GPTQ paper's default
CHECKPOINT_SCHEMA = 1
SETUP_FIX = "create it with: qeval setup --backend gptq"


# ---------------------------------------------------------------- calibration (from the plan)


@dataclass(frozen=True)
class CalibrationSpec:
    """The plan's `calibration:`: the text GPTQ's Hessians are measured on."""

    data: str = "lee_background"  # a built-in name (qeval.data.train_data.BUILTIN) or a .jsonl file / folder
    samples: int = 128  # sequences of seq_len tokens (the first ones of the EOS-joined, packed rows)
    seq_len: int = 512

    def problems(self, where: str = "calibration") -> list[QevalError]:
        from qeval.data.train_data import read_rows, resolve

        out = []
        for name in ("samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                out.append(QevalError(f"{where}.{name}", value, "a positive integer"))
        try:
            read_rows(resolve(self.data, f"{where}.data"))
        except QevalError as e:
            out += getattr(e, "errors", [e])
        return out

    def identity(self) -> dict:
        """What determines the calibration set: its content hash (not its path), samples, seq_len
        (the tokenizer is the model's, whose fingerprint every key carries)."""
        from qeval.data.train_data import resolve

        src = resolve(self.data, "calibration.data")
        return {"data": self.data if src.builtin else "local", "hash": src.hash, "samples": self.samples,
                "seq_len": self.seq_len, "packing": "pack"}


def calibrated(name: str, spec: CalibrationSpec) -> QuantFormat:
    """The calibration-based format `name` (gptq, awq) calibrated on `spec` (parsed again: the spec's
    data is hashed now, so a calibration file that changed gives a new spec, and so new keys)."""
    backend, scheme, *opts = FORMATS.get(name).name.split(":")  # the canonical name: defaults spelled out
    return BACKENDS.get(backend).parse(scheme, tuple(opts), spec)


def calibration_blocks(spec: CalibrationSpec, tokenizer) -> list[list[int]]:
    """The first `samples` blocks of `seq_len` tokens of the calibration rows, EOS-joined and packed
    (qeval.data.train_data's packing: the adapters' training data reads the same way)."""
    from qeval.data.train_data import make_blocks, read_rows, resolve

    rows = read_rows(resolve(spec.data, "calibration.data"))
    blocks = make_blocks(rows, tokenizer, spec.seq_len, "pack")
    if len(blocks.ids) == 0:
        raise QevalError("calibration.seq_len", spec.seq_len, "shorter than the calibration text (no full block)",
                         "lower calibration.seq_len or add rows")
    return blocks.ids[: spec.samples].tolist()


# ---------------------------------------------------------------- the isolated environment


def venv_dir() -> Path:
    return env.cache_dir() / "venvs" / "gptq"


def env_python() -> Path:
    override = os.environ.get(PYTHON_ENV)
    return Path(override).expanduser() if override else venv_dir() / "bin" / "python"


def _site_packages(python: Path) -> list[Path]:
    root = python.parent.parent
    return [Path(p) for p in glob.glob(str(root / "lib" / "python3*" / "site-packages"))]


def env_versions(python: Path | None = None) -> dict[str, str]:
    """Versions of the isolated env's gptqmodel / torch / transformers, read from its dist-info
    folders (no interpreter started: this runs in every validation)."""
    python = python or env_python()
    out = {}
    for sp in _site_packages(python):
        for dist in ("gptqmodel", "torch", "transformers"):
            for info in sp.glob(f"{dist}-*.dist-info"):
                out.setdefault(dist, info.name[len(dist) + 1: -len(".dist-info")])
    return out


def env_problem(fmt_name: str) -> QevalError | None:
    """One line when the isolated env is missing (or lacks gptqmodel): value, expected, the fix."""
    python = env_python()
    if not python.exists():
        return QevalError(f"quantization format {fmt_name} needs the isolated GPTQ environment", str(python),
                          f"a Python with gptqmodel {GPTQ_VERSION} (kept apart from qeval's torch/transformers)",
                          SETUP_FIX + (f", or point ${PYTHON_ENV} at one" if os.environ.get(PYTHON_ENV) else ""))
    if "gptqmodel" not in env_versions(python):
        return QevalError(f"quantization format {fmt_name} needs gptqmodel in the isolated environment",
                          str(python), f"gptqmodel {GPTQ_VERSION} installed there", SETUP_FIX)
    return None


def setup_env(progress=lambda s: print(s, file=sys.stderr, flush=True)) -> Path:
    """Create the isolated venv (idempotent): torch pinned first (CPU wheel), then gptqmodel with
    torch constrained, so nothing replaces torch. Returns its python."""
    python = venv_dir() / "bin" / "python"
    if python.exists() and env_versions(python).get("gptqmodel") == GPTQ_VERSION:
        progress(f"gptq env {venv_dir()}: ready ({env_versions(python)})")
        return python
    progress(f"gptq env: creating {venv_dir()} (torch {TORCH_PIN}, gptqmodel {GPTQ_VERSION}; a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir())], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
        c.write(TORCH_PIN + "\n")
    try:  # BUILD_CUDA_EXT=0: gptqmodel's sdist would otherwise try to compile CUDA kernels
        subprocess.run(pip + ["-c", c.name, f"gptqmodel=={GPTQ_VERSION}"], check=True,
                       env={**os.environ, "BUILD_CUDA_EXT": "0", "CUDA_VISIBLE_DEVICES": ""})
    finally:
        os.unlink(c.name)
    progress(f"gptq env {venv_dir()}: {env_versions(python)}")
    return python


# ---------------------------------------------------------------- reading a GPTQ checkpoint


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unpack int32 words holding 32/bits codes each, lowest bits first, along `dim` (0: GPTQ's
    qweight packs input rows; 1: qzeros packs output columns). Returns int64 codes."""
    import torch

    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # the int32 words as unsigned
    if dim == 0:
        codes = (words.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)  # [R, per, C]
        return codes.reshape(packed.shape[0] * per, packed.shape[1])
    codes = (words.unsqueeze(2) >> shifts.view(1, 1, per)) & ((1 << bits) - 1)  # [R, C, per]
    return codes.reshape(packed.shape[0], packed.shape[1] * per)


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
               bits: int, zero_offset: int = 1) -> torch.Tensor:
    """The float weight [out, in] of one GPTQ linear: W[o, i] = scale[g, o] * (q[i, o] - zero[g, o]),
    g = g_idx[i]. `zero_offset` 1 for the "gptq" (v1) checkpoint format, which stores zero - 1
    (AutoGPTQ's historical layout gptqmodel keeps on save); 0 for "gptq_v2"."""
    import torch

    q = unpack_int32(qweight, bits, 0)  # [in, out]
    z = unpack_int32(qzeros, bits, 1)[:, : scales.shape[1]] + zero_offset  # [groups, out]
    g = g_idx.to(torch.int64)
    w = scales.float()[g] * (q - z[g]).float()  # [in, out]
    return w.t().contiguous()


def packed_layer_bytes(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items()
               if k.startswith(prefix + ".") and k[len(prefix) + 1:] in ("qweight", "qzeros", "scales", "g_idx"))


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    cfg_file = folder / "quantize_config.json"
    qcfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else \
        json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    return tensors, qcfg


def apply_checkpoint(model, folder: Path, bits: int) -> None:
    """Replace every quantizable linear's float weight by its dequantized GPTQ weight; mark the
    layer with its packed bytes (the footprint: quantized, simulated)."""
    import torch

    tensors, qcfg = read_checkpoint(folder)
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ChildError("GPTQCheckpoint", f"{folder}: checkpoint_format {fmt!r}, expected gptq or gptq_v2")
    if int(qcfg.get("bits", bits)) != bits:
        raise ChildError("GPTQCheckpoint", f"{folder}: {qcfg.get('bits')} bits, expected {bits}")
    offset = 1 if fmt == "gptq" else 0
    with torch.no_grad():
        for name, m in quantizable_linears(model):
            key = name if f"{name}.qweight" in tensors else f"model.{name}" if f"model.{name}.qweight" in tensors else None
            if key is None:
                raise ChildError("GPTQCheckpoint", f"{folder}: no packed weight for layer {name}")
            w = dequantize(tensors[f"{key}.qweight"], tensors[f"{key}.qzeros"], tensors[f"{key}.scales"],
                           tensors[f"{key}.g_idx"], bits, offset)
            if tuple(w.shape) != tuple(m.weight.shape):
                raise ChildError("GPTQCheckpoint", f"{name}: dequantized {tuple(w.shape)} != {tuple(m.weight.shape)}")
            m.weight.copy_(w.to(m.weight.dtype))
            if m.bias is not None and f"{key}.bias" in tensors:
                m.bias.copy_(tensors[f"{key}.bias"].to(m.bias.dtype))
            mark(m, packed_bytes=packed_layer_bytes(tensors, key))


# ---------------------------------------------------------------- quantizing (the isolated child)


def checkpoint_key(fingerprint: str, options: dict, cal_identity: dict, versions: dict) -> str:
    return content_key({"schema": CHECKPOINT_SCHEMA, "model": fingerprint, "options": options,
                        "calibration": cal_identity, "gptq_env": versions})


def ensure_checkpoint(model_dir: Path, tokenizer, options: dict, cal: CalibrationSpec,
                      progress=lambda s: print(s, file=sys.stderr, flush=True)) -> Path:
    """The cached checkpoint for (model, options, calibration, env versions); quantized in the
    isolated env's child process when missing."""
    from filelock import FileLock

    if (problem := env_problem("gptq")) is not None:
        raise problem
    versions = env_versions()
    cal_id = cal.identity()
    key = checkpoint_key(fingerprint(model_dir), options, cal_id, versions)
    out = env.cache_dir() / "gptq" / key[:32]
    meta = out / "qeval-gptq.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # two processes wanting the same checkpoint: one quantizes
        if meta.is_file():
            return out
        for stale in out.parent.glob(f".{key[:12]}.*"):  # a killed run's work folder (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{key[:12]}."))
        try:
            blocks = calibration_blocks(cal, tokenizer)
            (work / "calibration.json").write_text(json.dumps(blocks))
            job = {"model_dir": str(model_dir), "calibration": str(work / "calibration.json"), "out": str(work / "ckpt"),
                   "bits": options["bits"], "group_size": options["group_size"], "desc_act": options["desc_act"],
                   "sym": options["sym"], "damp_percent": options["damp_percent"],
                   "method": options.get("method", "gptq"),  # awq: gptqmodel's AWQ (qeval.quant.backends.awq)
                   "threads": int(os.environ.get("GPTQMODEL_CPU_WORKERS") or _torch_threads())}
            (work / "job.json").write_text(json.dumps(job, indent=1))
            progress(f"gptq: quantizing {model_dir.name} {options} on {len(blocks)} x {cal.seq_len} calibration "
                     f"tokens in the isolated env ({env_python()})")
            t0 = time.perf_counter()
            child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
            child_env.update({"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                              "GPTQMODEL_CPU_WORKERS": str(job["threads"])})
            with open(work / "child.log", "wb") as log_f:
                rc = subprocess.run([str(env_python()), str(Path(__file__).with_name("gptq_child.py")),
                                     str(work / "job.json")], stdout=log_f, stderr=subprocess.STDOUT,
                                    env=child_env, cwd=str(work)).returncode
            if rc != 0:
                tail = (work / "child.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise ChildError("GPTQQuantizeFailed", f"gptq child exited {rc}: " + " | ".join(tail)[-400:])
            child = json.loads((work / "ckpt" / "qeval-gptq-child.json").read_text())
            shutil.move(str(work / "child.log"), str(work / "ckpt" / "child.log"))
            if out.exists():
                shutil.rmtree(out)
            os.replace(work / "ckpt", out)
            atomic_write(meta, json.dumps({"key": key, "model_dir": str(model_dir), "options": options,
                                           "calibration": cal_id, "samples_used": len(blocks),
                                           "env_versions": versions, "child": child,
                                           "wall_s": time.perf_counter() - t0}, indent=1, sort_keys=True))
            progress(f"gptq: quantized in {time.perf_counter() - t0:.0f} s -> {out}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------- the format


def _bits_per_weight(bits: int, group: int):
    # codes + per group one fp16 scale and one packed `bits`-bit zero point; g_idx (one int32 per
    # input column, 32/out_features bits a weight: 0.06 at 576) is left out of the theory
    return lambda in_features: bits + (16 + bits) / group


def _after_load(options: dict, cal: CalibrationSpec):
    def after_load(model, device: str, compute_dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer

        model_dir = Path(model.name_or_path)
        tok = AutoTokenizer.from_pretrained(model_dir)
        folder = ensure_checkpoint(model_dir, tok, options, cal)
        apply_checkpoint(model, folder, options["bits"])
    return after_load


def _parse(scheme: str, opts: tuple[str, ...], cal: CalibrationSpec | None = None) -> QuantFormat:
    base = f"gptq:{scheme}"
    group, desc_act, sym = DEFAULT_GROUP, False, True
    for o in opts:
        if len(o) > 1 and o[0] == "g" and o[1:].isdigit() and int(o[1:]) >= 8:
            group = int(o[1:])
        elif o == "act":
            desc_act = True
        elif o == "asym":
            sym = False
        else:
            raise bad_option(base, o, "a group size gN (N >= 8, e.g. g64), act (desc_act: columns by "
                             "decreasing Hessian diagonal) or asym (asymmetric zero points)")
    name = base + f":g{group}" + (":act" if desc_act else "") + (":asym" if not sym else "")
    bits = BITS[scheme]
    options = {"bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym, "damp_percent": DAMP_PERCENT}
    cal = cal or CalibrationSpec()  # by name alone: the default calibration set
    # the isolated env's versions (read from its dist-info; {} before it exists) move the numbers too
    spec_options = {**options, "calibration": cal.identity(), "gptq_env": env_versions()}
    return QuantFormat(
        name, f"GPTQ {bits}-bit, groups of {group}{', desc_act' if desc_act else ''}"
        f"{', symmetric' if sym else ', asymmetric'}; calibrated on {cal.samples} x {cal.seq_len} tokens of "
        f"{cal.data}; gptqmodel {GPTQ_VERSION} in an isolated env, dequantized here (simulated)",
        _bits_per_weight(bits, group), lambda compute_dtype: None, backend="gptq",
        after_load=_after_load(options, cal), kernel="simulated",
        storage="float weights holding the dequantized GPTQ values (packed checkpoint cached)",
        can_save=False, lora_trainable=False, options=tuple(sorted(spec_options.items())),
        packages=(), requires=BACKENDS.get("gptq"), divides=group)


BACKENDS.add("gptq", Backend(
    "gptq", "GPTQ (calibration-based, gptqmodel in an isolated venv), simulated from its packed checkpoint",
    _parse, tuple(BITS), modules=(), extra="gptq", calibration=True, check=env_problem,
    option_help="GPTQ schemes: " + ", ".join(BITS) + "; options gN, act, asym", colour="tab:purple",
    account=marked_account))
