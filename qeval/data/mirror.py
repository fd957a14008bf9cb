"""Air-gapped dataset mirror: serve hub datasets from local files, the way lm-eval runs offline.

`QEVAL_DATA_MIRROR=DIR` (or `data_mirror:` in a plan) names a folder laid out as

    DIR/<dataset_path with '/' replaced by '__'>/<dataset_name or 'default'>/<split>.jsonl  (or .parquet)

e.g. `DIR/allenai__ai2_arc/ARC-Easy/test.jsonl`, `DIR/cais__mmlu/abstract_algebra/dev.jsonl`.
While a task is evaluated, `datasets.load_dataset(path, name)` -- the call every lm-eval YAML task
makes -- is answered from that folder when it exists (lm-eval's own YAML, filters, groups and
metrics run unchanged); otherwise it goes to the hub as usual, and where the hub is out of reach
the task fails with one line naming the folder it expected. A mirrored dataset's fingerprint is the
content hash of its files, so a changed mirror file changes every cell key that reads it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from qeval.core import env
from qeval.core.errors import QevalError
from qeval.core.files import sha256_file

ENV_VAR = "QEVAL_DATA_MIRROR"
FORMATS = {".jsonl": "json", ".parquet": "parquet"}
# datasets' packaged builders read local files named in data_files: never a hub dataset
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder"}

_plan_mirror: Path | None = None  # `data_mirror:` of the plan being run (the variable wins)


def set_plan_mirror(path: str | Path | None, base: Path | None = None) -> None:
    """Record a plan's `data_mirror:` (relative to `base`, the plan's folder)."""
    global _plan_mirror
    if path is None or path == "":
        _plan_mirror = None
        return
    p = Path(path).expanduser()
    _plan_mirror = ((base or Path.cwd()) / p).resolve() if not p.is_absolute() else p


def mirror_root() -> Path | None:
    """The mirror folder in use: $QEVAL_DATA_MIRROR, else the plan's `data_mirror:`, else None."""
    value = os.environ.get(ENV_VAR)
    if value:
        return Path(value).expanduser().resolve()
    return _plan_mirror


def check_root(root: Path | None, where: str = ENV_VAR) -> None:
    if root is not None and not root.is_dir():
        raise QevalError(where, str(root), "an existing folder laid out as <dataset_path with / as __>/"
                         "<dataset_name or default>/<split>.jsonl", "create it or unset " + ENV_VAR)


def dataset_folder(root: Path, path: str, name: str | None) -> Path:
    return root / path.replace("/", "__") / (name or "default")


def split_files(folder: Path) -> dict[str, Path]:
    """split name -> file, for the .jsonl / .parquet files of one mirrored dataset folder."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        if p.suffix in FORMATS and p.is_file():
            if p.stem in out:
                raise QevalError("data mirror split", str(p), f"one file per split (also {out[p.stem].name})",
                                 "keep either the .jsonl or the .parquet file")
            out[p.stem] = p
    return out


def is_hub_dataset(path: str | None) -> bool:
    """A `dataset_path` that names a hub dataset (not a packaged local-file builder or a folder)."""
    return bool(path) and path not in LOCAL_BUILDERS and not Path(path).expanduser().exists()


def dataset_fingerprint(root: Path, path: str, name: str | None) -> str | None:
    """sha256 over the mirrored dataset's split files (names + content), None where not mirrored."""
    files = split_files(dataset_folder(root, path, name))
    if not files:
        return None
    h = hashlib.sha256()
    for split, p in sorted(files.items()):
        h.update(f"{split}{p.suffix}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


def missing_line(root: Path | None, path: str, name: str | None, task: str) -> QevalError:
    """The one line for a dataset neither mirrored nor reachable."""
    if root is None:
        return QevalError(f"task {task} dataset", f"{path} ({name or 'default'})",
                          "a reachable hub dataset or a local mirror",
                          f"set {ENV_VAR}=DIR with DIR/{path.replace('/', '__')}/{name or 'default'}/<split>.jsonl, "
                          "or run with network access")
    folder = dataset_folder(root, path, name)
    return QevalError(f"task {task} dataset", f"{path} ({name or 'default'})",
                      f"mirrored files at {folder}/<split>.jsonl (or .parquet)",
                      "copy the dataset's splits there, or run with network access")


@contextlib.contextmanager
def serving(root: Path | None, task: str = ""):
    """Answer `datasets.load_dataset(path, name)` from the mirror while the block runs."""
    import datasets

    if root is None:
        yield
        return
    original = datasets.load_dataset

    def load_dataset(path=None, name=None, *args, **kwargs):
        if isinstance(path, str) and is_hub_dataset(path):
            files = split_files(dataset_folder(root, path, name))
            if files:
                kinds = {FORMATS[p.suffix] for p in files.values()}
                if len(kinds) > 1:
                    raise QevalError("data mirror", str(dataset_folder(root, path, name)),
                                     "one file format per dataset (.jsonl or .parquet)", "convert the odd split")
                return original(kinds.pop(), data_files={s: str(p) for s, p in files.items()})
            if env.is_offline():
                raise missing_line(root, path, name, task)
        return original(path, name, *args, **kwargs)

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original
