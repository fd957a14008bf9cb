"""The result store: immutable records keyed by a content hash, in one SQLite file.

A record is written once, in its own transaction, as soon as its cell finishes: a crash loses only
the cell in flight, and a rerun finds every finished cell by key and computes only what is missing.
Records are never updated; `put` of an existing key is a no-op. Per-sample outputs live in a side
table (zlib-compressed JSON) so listing records stays fast.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import zlib
from pathlib import Path
from typing import Any, Iterator

SCHEMA_VERSION = 1  # part of every key: bump when the meaning of a record changes


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def content_key(obj: Any) -> str:
    """sha256 of the canonical JSON of everything that determines a result."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # timeout: a second qeval process on the same store waits for the writer instead of failing
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS records (
                key TEXT PRIMARY KEY, variant TEXT NOT NULL, task TEXT NOT NULL,
                created_at TEXT NOT NULL, record TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, data BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS records_variant ON records(variant, task);
            CREATE TABLE IF NOT EXISTS runs (
                run_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, started_at TEXT NOT NULL,
                finished_at TEXT, status TEXT NOT NULL, info TEXT NOT NULL);
        """)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM records WHERE key=?", (key,)).fetchone() is not None

    def put(self, record: dict, samples: list[dict] | None = None) -> bool:
        """Insert `record` (it must carry `key`, `variant_id`, `task.name`, `created_at`) and its
        samples atomically. Returns False when the key was already stored (records are immutable)."""
        key = record["key"]
        with self._transaction():
            cur = self._db.execute(
                "INSERT OR IGNORE INTO records(key, variant, task, created_at, record) VALUES (?,?,?,?,?)",
                (key, record["variant_id"], record["task"]["name"], record["created_at"], canonical_json(record)))
            if cur.rowcount and samples is not None:
                blob = zlib.compress(canonical_json(samples).encode(), 6)
                self._db.execute("INSERT OR REPLACE INTO samples(key, data) VALUES (?,?)", (key, blob))
        return bool(cur.rowcount)

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT record FROM records WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def samples(self, key: str) -> list[dict] | None:
        row = self._db.execute("SELECT data FROM samples WHERE key=?", (key,)).fetchone()
        return json.loads(zlib.decompress(row[0])) if row else None

    def records(self) -> Iterator[dict]:
        for (rec,) in self._db.execute("SELECT record FROM records ORDER BY created_at, key"):
            yield json.loads(rec)

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def _transaction(self):
        db = self._db

        class _Tx:
            def __enter__(self_inner):
                db.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, *_):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return _Tx()

    # -- runs: one row per nightly run; `info` (JSON) holds the plan, versions, git sha, the keys of
    # the plan's cells and, once finished, which were computed or reused and the regressions found.
    def start_run(self, kind: str, info: dict) -> int:
        with self._transaction():
            cur = self._db.execute("INSERT INTO runs(kind, started_at, status, info) VALUES (?, ?, 'running', ?)",
                                   (kind, _now(), canonical_json(info)))
        return int(cur.lastrowid)

    def finish_run(self, run_id: int, status: str, info: dict) -> None:
        with self._transaction():
            self._db.execute("UPDATE runs SET finished_at=?, status=?, info=? WHERE run_id=?",
                             (_now(), status, canonical_json(info), run_id))

    def runs(self, kind: str | None = None) -> list[dict]:
        q = "SELECT run_id, kind, started_at, finished_at, status, info FROM runs"
        rows = self._db.execute(q + (" WHERE kind=?" if kind else "") + " ORDER BY run_id", (kind,) if kind else ())
        return [{"run_id": r[0], "kind": r[1], "started_at": r[2], "finished_at": r[3], "status": r[4],
                 **json.loads(r[5])} for r in rows]

    def integrity_ok(self) -> bool:
        return self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
