"""`qeval gc`: delete cached references and adapters that no stored record uses."""
from __future__ import annotations

from pathlib import Path

from qeval.cli.base import Command, register, store_path


def arguments(gcp) -> None:
    gcp.add_argument("--store", type=Path, default=None)
    gcp.add_argument("--dry-run", action="store_true", help="only list what would be deleted")


def cmd_gc(args) -> int:
    from qeval.store.gc import collect

    return collect(store_path(args), dry_run=args.dry_run)


register(Command("gc", "delete cached references and adapters that no stored record uses", cmd_gc, arguments,
                 dict(description="List (and unless --dry-run delete) divergence references and adapter "
                                  "artifacts in the cache that no record in the store refers to; prints sizes.")))
