"""Lazy re-exports for a package's `__init__` (PEP 562), written once for every stage package.

A stage package lists its public names in its `__init__`, but importing them eagerly would pull
torch or pandas into every light command (`qeval --help`, `qeval report`): `__getattr__` imports the
owning module on first use instead.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable


def lazy_exports(package: str, homes: dict[str, Iterable[str]], first: str | None = None
                 ) -> tuple[Callable[[str], object], list[str]]:
    """(`__getattr__`, `__all__`) for `package` from {module: names}; a module is named relative to
    the package ("load") or in full ("qeval.core.names"). `first` is imported before any name is
    looked up (a registry whose members register on that import)."""
    home = {name: (mod if mod.startswith("qeval.") else f"{package}.{mod}")
            for mod, names in homes.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if first:
            importlib.import_module(first)
        return getattr(importlib.import_module(home[name]), name)

    return __getattr__, sorted(home)
