"""The file primitives every module shares: atomic writes, content hashing, the store's lock, and
seals (a sha256 recorded beside a cached file when it is made, checked when it is reused).

One implementation each, so that every file qeval writes (reports, references, adapter metadata,
suite data, fingerprint memos) is either the old or the new version after a crash, never half of
one, and every hash of a file streams instead of reading multi-GB weights into memory. A model
folder's `fingerprint` lives here too (not in qeval.models): the quantization backends key their
cached checkpoints by it, and they sit below the models layer.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import time
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
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            from qeval.core.errors import CouldNotFinish

            # not a bug, not bad input: one line, exit 3; `path` still holds its old version (or nothing)
            raise CouldNotFinish("file", str(path), "free disk space to write it",
                                 f"{e.strerror}: free space on {path.parent} (or point QEVAL_CACHE / --store "
                                 "elsewhere) and rerun; finished cells are kept") from None
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
    `timeout` seconds; then CouldNotFinish (exit 3) with what to do. The file is removed on release,
    so a finished run leaves none (one left by a killed run is harmless: the next run locks it)."""
    from qeval.core.errors import CouldNotFinish

    timeout = lock_timeout() if timeout is None else timeout
    path = Path(str(store_path) + f".{name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, min(2.0, timeout))
    if fd is None:
        if progress:
            holder = _holder(path)
            progress(f"waiting for another qeval process{holder} holding {path.name} (up to {timeout:.0f} s)")
        fd = _acquire(path, max(0.0, timeout - 2.0))
        if fd is None:
            raise CouldNotFinish("lock", str(path), f"to be free within {timeout:.0f} s",
                                 "another qeval process on this store is still running (or hung): check it, "
                                 "or raise QEVAL_LOCK_TIMEOUT")
    try:
        yield
    finally:
        # Unlink while still holding it: a waiter that then locks this (now nameless) file sees that
        # `path` no longer names it and starts over on a fresh file, so two processes never both
        # believe they hold the lock (removing it after the release would let one lock the old file
        # while another creates and locks a new one).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the flock


def _acquire(path: Path, timeout: float) -> int | None:
    """An fd holding an exclusive flock on the file `path` names *now*, or None after `timeout` s."""
    import fcntl

    deadline = time.monotonic() + timeout
    pause = 0.02
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(0.5, pause * 1.5)  # a 6 h wait polls twice a second, a short one at once
            continue
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for the waiting line
            return fd
        os.close(fd)  # its holder removed it as it let go: lock the file `path` names now


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(path.read_text().strip())})"
    return ""


# -- integrity of cached files: a hash written beside a file when it is made, checked when it is reused

def seal_path(path: Path) -> Path:
    return Path(str(path) + ".sha256")


def seal(path: Path) -> str:
    """Record `path`'s sha256 beside it (`<path>.sha256`); returns it."""
    digest = sha256_file(path)
    atomic_write(seal_path(path), digest + "\n")
    return digest


def verified(path: Path, sha256: str) -> bool:
    """Whether `path` exists and its bytes hash to `sha256`."""
    try:
        return sha256_file(path) == sha256
    except FileNotFoundError:
        return False


_INTACT: dict[tuple, bool] = {}  # (path, sizes, mtimes) -> checked in this process: a plan asks per cell


def intact(path: Path, what: str = "cached file") -> bool:
    """Whether the cached file `path` is whole: it exists and matches its seal. A corrupt one is
    removed (with its seal) and reported in one line, so that its maker recomputes it; one without
    a seal (written before seals existed, or a crash between the file and its seal) is sealed now."""
    from qeval.core.console import say

    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo in _INTACT:
        return _INTACT[memo]
    try:
        expected = seal_path(path).read_text().strip()
    except FileNotFoundError:
        seal(path)
        _INTACT[memo] = True
        return True
    ok = verified(path, expected)
    if not ok:
        say(f"WARNING {what} {path} is corrupt (sha256 differs from the one recorded when it was written): "
            "removed, recomputing it")
        for p in (path, seal_path(path)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    _INTACT[memo] = ok
    return ok


def seal_folder(folder: Path, manifest: str) -> None:
    """Record the sha256 of every file under `folder` in `folder/manifest` (JSON: name -> sha256)."""
    folder = Path(folder)
    digests = {str(f.relative_to(folder)): sha256_file(f) for f in sorted(folder.rglob("*"))
               if f.is_file() and f.name != manifest}
    atomic_write(folder / manifest, json.dumps(digests, indent=1, sort_keys=True))


def folder_intact(folder: Path, manifest: str, what: str = "cached folder") -> bool:
    """`intact` for a folder sealed by `seal_folder`: every file it lists is there with its hash. A
    corrupt folder is removed (one line says so); one without a manifest is sealed now."""
    import shutil

    from qeval.core.console import say

    folder = Path(folder)
    if not folder.is_dir():
        return False
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    memo = (str(folder), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if memo in _INTACT:
        return _INTACT[memo]
    try:
        digests = json.loads((folder / manifest).read_text())
    except FileNotFoundError:
        seal_folder(folder, manifest)
        return True
    except ValueError:
        digests = None
    bad = ["(" + manifest + ")"] if not isinstance(digests, dict) else \
        [name for name, digest in digests.items() if not verified(folder / name, digest)]
    if bad:
        say(f"WARNING {what} {folder} is corrupt ({', '.join(bad[:3])}: sha256 differs from the one recorded "
            "when it was written): removed, recomputing it")
        shutil.rmtree(folder, ignore_errors=True)
    _INTACT[memo] = not bad
    return not bad
