"""The result store: immutable records keyed by a content hash, in one SQLite file.

A record is written once, in its own transaction, as soon as its cell finishes: a crash loses only
the cell in flight, and a rerun finds every finished cell by key and computes only what is missing.
Records are never updated; `put` of an existing key is a no-op. Per-sample outputs live in a side
table (zlib-compressed JSON) so listing records stays fast.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import zlib
from pathlib import Path
from typing import Iterator

from qeval.core.errors import CouldNotFinish, QevalError
from qeval.core.files import canonical_json, content_key  # noqa: F401  (re-exported: keys live beside records)
from qeval.store.record import ParityRecord, Record, SpeedRecord

SCHEMA_VERSION = 1  # part of every key: bump when the meaning of a record changes

SQLITE_MAGIC = b"SQLite format 3\x00"


def _store_error(path: Path, expected: str, fix: str) -> QevalError:
    return QevalError("result store", str(path), expected, fix)


def check_store_path(path: Path, write: bool) -> None:
    """Refuse what SQLite would turn into a traceback, before anything is written: a folder, a file
    that is not SQLite, a read-only file or folder (to write), a missing or empty store (to read)."""
    path = Path(path)
    fix = "pass --store with a qeval store (or a new file path), or set QEVAL_STORE"
    if path.is_dir():
        raise _store_error(path, "a SQLite file, not a folder", fix)
    if path.exists():
        if not path.is_file():
            raise _store_error(path, "a regular SQLite file", fix)
        size = path.stat().st_size
        if size == 0 and not write:
            raise _store_error(path, "a store with results (this file is empty)", "run `qeval run` first, or " + fix)
        if size:
            try:
                with open(path, "rb") as f:
                    magic = f.read(16)
            except OSError as e:
                raise _store_error(path, "a readable file", f"{e.strerror}; check its permissions") from None
            if magic != SQLITE_MAGIC:
                raise _store_error(path, "a SQLite database (this file is something else)", fix)
        # root ignores permission bits, so look at them too: a file nobody may write is read-only
        if write and (not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222):
            raise _store_error(path, "a writable file", "make it writable (chmod u+w) or pass another --store")
    elif not write:
        raise _store_error(path, "an existing store", "run `qeval run` first (or pass --store)")
    else:
        parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
        if not parent.is_dir():
            raise _store_error(path, "a path inside a folder", f"{parent} is a file; pass another --store")
        if not os.access(parent, os.W_OK) or not parent.stat().st_mode & 0o222:
            raise _store_error(path, "a path in a writable folder", f"{parent} is read-only; pass another --store")


class Store:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        check_store_path(self.path, write=not readonly)
        created = not self.path.exists()
        try:
            self._db = self._open()
        except sqlite3.Error as e:
            if created:  # leave no 0-byte store (nor its WAL files: a full disk) behind
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(OSError):
                        Path(str(self.path) + suffix).unlink()
            raise _sqlite_error(self.path, e) from None

    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            # read-only: `qeval report` must never write (not even a schema) into what it reads
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, timeout=60, isolation_level=None)
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"records", "samples", "runs"} <= tables:
                db.close()
                raise QevalError("result store", str(self.path), "a qeval result store (tables records, samples, runs)",
                                 "this SQLite file belongs to something else; pass --store with a qeval store")
            return db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # timeout: a second qeval process on the same store waits for the writer instead of failing
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript("""
            CREATE TABLE IF NOT EXISTS records (
                key TEXT PRIMARY KEY, variant TEXT NOT NULL, task TEXT NOT NULL,
                created_at TEXT NOT NULL, record TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, data BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS records_variant ON records(variant, task);
            CREATE TABLE IF NOT EXISTS runs (
                run_id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, started_at TEXT NOT NULL,
                finished_at TEXT, status TEXT NOT NULL, info TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS speed (
                key TEXT PRIMARY KEY, variant TEXT NOT NULL, created_at TEXT NOT NULL, record TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS parity (
                key TEXT PRIMARY KEY, variant TEXT NOT NULL, created_at TEXT NOT NULL, record TEXT NOT NULL);
        """)
        return db

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM records WHERE key=?", (key,)).fetchone() is not None

    def put(self, record: Record, samples: list[dict] | None = None) -> bool:
        """Insert `record` and its samples atomically. Returns False when the key was already
        stored (records are immutable)."""
        key = record.key
        with self._transaction():
            # the stored text is the record's canonical JSON, exactly as before records were typed
            cur = self._db.execute(
                "INSERT OR IGNORE INTO records(key, variant, task, created_at, record) VALUES (?,?,?,?,?)",
                (key, record.variant_id, record.task.name, record.created_at, canonical_json(record.to_json())))
            if cur.rowcount and samples is not None:
                blob = zlib.compress(canonical_json(samples).encode(), 6)
                self._db.execute("INSERT OR REPLACE INTO samples(key, data) VALUES (?,?)", (key, blob))
        return bool(cur.rowcount)

    def get(self, key: str) -> Record | None:
        row = self._db.execute("SELECT record FROM records WHERE key=?", (key,)).fetchone()
        return Record.from_json(json.loads(row[0])) if row else None

    def samples(self, key: str) -> list[dict] | None:
        row = self._db.execute("SELECT data FROM samples WHERE key=?", (key,)).fetchone()
        return json.loads(zlib.decompress(row[0])) if row else None

    def records(self) -> Iterator[Record]:
        for (rec,) in self._db.execute("SELECT record FROM records ORDER BY created_at, key"):
            yield Record.from_json(json.loads(rec))

    # -- side records: speed (qeval.store.record.SpeedRecord) and GGUF parity (ParityRecord), each in a
    # table of its own, so every reader of `records` sees accuracy cells only; a store written before
    # a table existed (opened read-only) has none of its records.
    def _has_table(self, table: str) -> bool:
        return self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None

    def _has_side(self, table: str, key: str) -> bool:
        return self._has_table(table) and \
            self._db.execute(f"SELECT 1 FROM {table} WHERE key=?", (key,)).fetchone() is not None

    def _put_side(self, table: str, key: str, variant: str, created_at: str, record: dict) -> bool:
        """Insert a side record; False when its key was stored already (records are immutable)."""
        with self._transaction():
            cur = self._db.execute(f"INSERT OR IGNORE INTO {table}(key, variant, created_at, record) VALUES (?,?,?,?)",
                                   (key, variant, created_at, canonical_json(record)))
        return bool(cur.rowcount)

    def _side(self, table: str) -> Iterator[dict]:
        if self._has_table(table):
            for (rec,) in self._db.execute(f"SELECT record FROM {table} ORDER BY created_at, key"):
                yield json.loads(rec)

    def has_speed(self, key: str) -> bool:
        return self._has_side("speed", key)

    def put_speed(self, record: SpeedRecord) -> bool:
        return self._put_side("speed", record.key, record.variant_id, record.created_at, record.to_json())

    def has_speed_kernels(self, kernels: str) -> bool:
        """Whether a speed record measured these kernels (qeval.run.cells.kernels_key); a scan: the
        speed table holds one small record per arm and device."""
        return bool(kernels) and any(d.get("kernels") == kernels for d in self._side("speed"))

    def speed_records(self) -> Iterator[SpeedRecord]:
        return (SpeedRecord.from_json(d) for d in self._side("speed"))

    def has_parity(self, key: str) -> bool:
        return self._has_side("parity", key)

    def put_parity(self, record: ParityRecord) -> bool:
        return self._put_side("parity", record.key, record.model.spec, record.created_at, record.to_json())

    def parity_records(self) -> Iterator[ParityRecord]:
        return (ParityRecord.from_json(d) for d in self._side("parity"))

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    @contextlib.contextmanager
    def _transaction(self):
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                if self._db.in_transaction:  # SQLite already rolled back after some errors (SQLITE_FULL)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            # a full disk, a store made read-only mid-run: one line, and the earlier cells stay stored
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise _sqlite_error(self.path, e) from None

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


def _sqlite_error(path: Path, e: sqlite3.Error) -> QevalError:
    msg = str(e)
    if "full" in msg:  # not the user's input: exit 3 (could not finish), like a lock held too long
        return CouldNotFinish("result store", str(path), "free disk space for the store",
                              f"SQLite: {msg}; free space and rerun (finished cells are kept)")
    if "readonly" in msg or "read-only" in msg:
        return QevalError("result store", str(path), "a writable file", f"SQLite: {msg}; pass another --store")
    if "not a database" in msg or "malformed" in msg:
        return QevalError("result store", str(path), "an intact SQLite database", f"SQLite: {msg}; pass another --store")
    return QevalError("result store", str(path), "a usable SQLite store", f"SQLite: {msg}")


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
