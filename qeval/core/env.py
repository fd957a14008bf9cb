"""Facts about the environment a result was computed in: versions, git sha, device, paths."""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

# Libraries whose versions can change the numbers; they are part of every result key.
KEY_LIBRARIES = ("torch", "transformers", "bitsandbytes", "lm_eval", "peft", "accelerate", "datasets")

# Shipped, read-only data (suite and task YAML) travels inside the package, so an installed qeval
# (wheel, non-editable `pip install .`) finds it wherever site-packages is.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the `qeval` package folder
PACKAGE_DATA = PACKAGE_ROOT / "data"
# The shipped suites and task YAML: the top-level suites/ of a checkout (editable install), or the
# `qeval.shipped_suites` folder a wheel installs them into (pyproject's package-dir mapping).
SHIPPED_SUITES = (PACKAGE_ROOT / "shipped_suites" if (PACKAGE_ROOT / "shipped_suites").is_dir()
                  else PACKAGE_ROOT.parent / "suites")


def cache_dir() -> Path:
    """Where converted models, suite data, references and adapters live (QEVAL_CACHE overrides;
    default ~/.cache/qeval). Absolute: evaluation may change the working directory."""
    return Path(os.environ.get("QEVAL_CACHE") or Path.home() / ".cache" / "qeval").expanduser().absolute()


def adapter_dir(key: str) -> Path:
    """The cache folder of the adapter artifact with key `key` (the one place its layout is said)."""
    return cache_dir() / "adapters" / key[:32]


def home() -> Path:
    """Where outputs go by default: $QEVAL_HOME, else the current directory (like git or make: run
    qeval in the folder you want `results/` and `reports/` in)."""
    return Path(os.environ.get("QEVAL_HOME") or ".").expanduser()


def default_store_path() -> Path:
    return Path(os.environ.get("QEVAL_STORE") or home() / "results" / "qeval.sqlite")


def default_report_dir() -> Path:
    return home() / "reports" / "latest"


def is_offline() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network."""
    flags = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "QEVAL_OFFLINE")
    return any(os.environ.get(f, "").strip().lower() in ("1", "true", "yes", "on") for f in flags)


def set_offline() -> None:
    for f in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[f] = "1"


@functools.cache
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in KEY_LIBRARIES:
        try:
            out[lib] = metadata.version(lib.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def lock_drift(lock_file: Path) -> dict[str, tuple[str, str]]:
    """Libraries that move numbers (KEY_LIBRARIES) whose installed version differs from the lock
    file's pin: name -> (locked, installed). Empty when the file is absent (an installed qeval has
    no lock file: then there is nothing to drift from)."""
    if not lock_file.is_file():
        return {}
    pins = {}
    for line in lock_file.read_text(encoding="utf-8").splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and not name.startswith("#"):
            pins[name.lower().replace("-", "_")] = version
    now = versions()
    return {lib: (pins[lib], now[lib]) for lib in KEY_LIBRARIES if lib in pins and pins[lib] != now.get(lib)}


@functools.cache
def git_sha() -> str:
    """qeval's own source revision: HEAD's sha, suffixed '-dirty' when the tree has uncommitted
    changes; 'unknown' for an installed package (not inside a git checkout; stderr is captured so
    no "fatal: not a git repository" reaches the user)."""
    src = PACKAGE_ROOT.parent
    if not (src / ".git").exists():
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if sha and dirty else "")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_isa() -> str | None:
    """The CPU's native bfloat16 matmul instructions, best first: "amx_bf16" (AMX tiles),
    "avx512_bf16", or None (then bf16 matmuls are emulated, 8-20x slower than float32, and rounded
    differently): bf16 numbers on CPU depend on which of these ran them."""
    flags = cpu_flags()
    return next((isa for isa in ("amx_bf16", "avx512_bf16") if isa in flags), None)


@functools.cache
def gpu_identity() -> dict[str, str] | None:
    """What GPU numbers depend on beyond library versions: the GPU model and compute capability,
    the CUDA runtime torch was built with, the driver, and the bitsandbytes kernel library that
    loads (bitsandbytes picks libbitsandbytes_cuda<torch's CUDA>, or $BNB_CUDA_VERSION's); None
    without a CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    cuda = torch.version.cuda or "?"
    return {"gpu": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "cuda": cuda, "driver": _nvidia_driver(),
            "bnb_build": "cuda" + (os.environ.get("BNB_CUDA_VERSION") or cuda.replace(".", ""))}


def _nvidia_driver() -> str:
    try:
        for line in Path("/proc/driver/nvidia/version").read_text().splitlines():
            if "Kernel Module" in line:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04 ..."
                return line.split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def key_environment(device: str) -> dict[str, str]:
    """The environment part of a result key: the library versions, and on CUDA the GPU identity
    (a driver without a GPU, e.g. a Ray head node, keys "unknown" and its workers must agree)."""
    if not device.startswith("cuda"):
        return versions()  # CPU keys stay what they were
    gpu = gpu_identity() or {"gpu": "unknown (the driver process has no GPU)"}
    return {**versions(), **{f"gpu_{k}" if k != "gpu" else k: v for k, v in gpu.items()}}


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()}:{os.cpu_count()}cores"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_identity(device: str) -> dict[str, str]:
    """What a speed number depends on beyond the libraries: the GPU model (on CUDA) or the CPU
    model, its core count and the threads torch computes with. Part of speed records' keys only
    (accuracy keys keep `key_environment`)."""
    if device.startswith("cuda"):
        gpu = gpu_identity() or {"gpu": "unknown (no GPU here)"}
        return {"kind": "cuda", "gpu": gpu["gpu"], "capability": gpu.get("capability", "?")}
    import torch

    return {"kind": "cpu", "cpu": cpu_model(), "cores": str(os.cpu_count()), "threads": str(torch.get_num_threads())}
