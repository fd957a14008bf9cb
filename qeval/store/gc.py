"""`qeval gc`: delete cached divergence references and adapter artifacts no stored record uses.

References and adapters live in the cache (content-addressed, reused across stores), so nothing
deletes them when records go away; this lists each one with its size and removes those that no
record of the given store refers to.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from qeval.core import env
from qeval.core.files import seal_path
from qeval.store.store import Store


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def referenced(store_path: Path) -> tuple[set[str], set[str], set[str]]:
    """(reference file stems, head file stems, adapter folder names) the store's records refer to."""
    refs, heads, adapters = set(), set(), set()
    with Store(store_path, readonly=True) as store:
        for rec in store.records():
            if rec.divergence is not None and not rec.stored("divergence_reference"):
                # written before records named their reference: which files it used is unknown
                refs.add("*")
            if rec.divergence_reference:
                refs.add(rec.divergence_reference[:32])
            if rec.divergence_head:
                heads.add(rec.divergence_head[:32])
            if rec.adapter is not None and rec.adapter.key:
                adapters.add(rec.adapter.key[:32])
    return refs, heads, adapters


def collect(store_path: Path, dry_run: bool = False, out=print) -> int:
    refs, heads, adapters = referenced(store_path)
    cache = env.cache_dir()
    keep_all = "*" in refs  # legacy records: keep every reference rather than guess
    if keep_all:
        out("note: some records predate reference tracking; keeping all divergence references")
    candidates = [(p, keep_all or p.stem in refs) for p in sorted((cache / "references").glob("*.safetensors"))]
    candidates += [(p, keep_all or p.stem in heads)
                   for p in sorted((cache / "references" / "heads").glob("*.safetensors"))]
    candidates += [(p, p.name in adapters) for p in sorted((cache / "adapters").glob("*")) if p.is_dir()]
    kept = freed = 0
    for path, used in candidates:
        size = _size(path)
        if used:
            kept += size
            continue
        freed += size
        out(f"{'would delete' if dry_run else 'deleted'} {path} ({size / 2**20:.1f} MiB)")
        if not dry_run:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            seal_path(path).unlink(missing_ok=True)  # its recorded sha256 (qeval.core.files.seal)
    out(f"{'would free' if dry_run else 'freed'} {freed / 2**20:.1f} MiB; kept {kept / 2**20:.1f} MiB in use "
        f"by {store_path}")
    return 0
