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

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Where converted models live (QEVAL_CACHE overrides; default ~/.cache/qeval)."""
    return Path(os.environ.get("QEVAL_CACHE") or Path.home() / ".cache" / "qeval").expanduser()


def default_store_path() -> Path:
    return Path(os.environ.get("QEVAL_STORE") or REPO_ROOT / "results" / "qeval.sqlite")


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


@functools.cache
def git_sha() -> str:
    """HEAD's sha, suffixed '-dirty' when the tree has uncommitted changes ('unknown' outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("-dirty" if sha and dirty else "")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()}:{os.cpu_count()}cores"
