"""The two file primitives every module shares: atomic writes and content hashing.

One implementation each, so that every file qeval writes (reports, references, adapter metadata,
suite data, fingerprint memos) is either the old or the new version after a crash, never half of
one, and every hash of a file streams instead of reading multi-GB weights into memory. A model
folder's `fingerprint` lives here too (not in qeval.models): the quantization backends key their
cached checkpoints by it, and they sit below the models layer.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

CHUNK = 1 << 22  # 4 MiB: large enough to hash at disk speed, small enough to never matter for memory


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def content_key(obj: Any) -> str:
    """sha256 of the canonical JSON of everything that determines a result."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(folder: Path) -> str:
    """sha256 over a model folder's config, tokenizer and weight files (memoized by size + mtime:
    hashing is ~1 s/500 MB)."""
    from qeval.core import env

    # The tokenizer is part of the model: a changed vocabulary changes every score.
    files = sorted(f for f in folder.iterdir() if f.is_file() and (
        f.name in ("config.json", "generation_config.json") or f.name.startswith("tokenizer")
        or f.suffix in (".safetensors", ".bin", ".pt", ".model")))
    stat = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    memo = env.cache_dir() / "fingerprints" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24] + ".json")
    if memo.is_file():
        with contextlib.suppress(ValueError, KeyError):
            saved = json.loads(memo.read_text())
            if saved["stat"] == stat:
                return saved["fingerprint"]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    fp = h.hexdigest()
    atomic_write(memo, json.dumps({"stat": stat, "fingerprint": fp}))
    return fp


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to a uniquely named temporary file beside `path`, fsync it, rename it over `path`.

    The unique name lets two processes write the same target at once (the last rename wins with a
    whole file); the same directory keeps the rename atomic (no cross-device copy)."""
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data))


def atomic_write_with(path: Path, write: Callable[[str], Any]) -> None:
    """Like `atomic_write`, for writers that want a file name (safetensors' save_file, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def lock_timeout() -> float:
    """Seconds to wait for a lock another qeval process holds ($QEVAL_LOCK_TIMEOUT, default 6 h):
    long enough for a real run to finish, short enough that a hung one does not block every night."""
    try:
        return float(os.environ.get("QEVAL_LOCK_TIMEOUT") or 6 * 3600)
    except ValueError:
        return 6 * 3600.0


@contextlib.contextmanager
def store_lock(store_path: Path, name: str, progress: Callable[[str], None] | None = None,
               timeout: float | None = None):
    """Hold `<store>.<name>.lock` (an OS lock: a killed holder releases it at once), waiting at most
    `timeout` seconds; then CouldNotFinish (exit 3) with what to do."""
    from filelock import FileLock, Timeout

    from qeval.core.errors import CouldNotFinish

    timeout = lock_timeout() if timeout is None else timeout
    path = Path(str(store_path) + f".{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=min(2.0, timeout))
    except Timeout:
        if progress:
            progress(f"waiting for another qeval process holding {path.name} (up to {timeout:.0f} s)")
        try:
            lock.acquire(timeout=max(0.0, timeout - 2.0))
        except Timeout:
            raise CouldNotFinish("lock", str(path), f"to be free within {timeout:.0f} s",
                                 "another qeval process on this store is still running (or hung): check it, "
                                 "or raise QEVAL_LOCK_TIMEOUT") from None
    try:
        yield
    finally:
        lock.release()
