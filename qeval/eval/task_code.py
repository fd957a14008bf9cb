"""Where task code runs: a folder named with `--include-path` / `include_path:` is code.

lm-eval imports the module of every `!function module.name` tag in a task YAML it loads -- in this
process, and on every Ray worker that evaluates the task. Its loader looks for `module.py` beside
the YAML and, when that file is absent, imports `module` from anywhere on `sys.path` (the working
directory included, under `python -m qeval`); an `include:` can pull in a YAML from any folder,
whose tags are resolved beside *it*. qeval checks before lm-eval sees a task: every YAML a task
reads lies inside the shipped tasks folder or a folder the user named, and every `!function` module
is a file beside its YAML inside such a folder. Anything else is refused (one line, exit 2), so no
module is imported from a folder the user did not name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from qeval.core.errors import QevalError
from qeval.core.yaml_safe import load_yaml
from qeval.eval.tasks import TASKS_DIR, entries_problems, task_members

FUNCTION_TAG = "!function "  # how qeval's loader keeps lm-eval's tag: "!function module.name"


def function_refs(doc: Any) -> Iterator[str]:
    """The `module.name` of every `!function` tag in a loaded task YAML (at any depth)."""
    if isinstance(doc, str):
        if doc.startswith(FUNCTION_TAG):
            yield doc[len(FUNCTION_TAG):].strip()
    elif isinstance(doc, dict):
        for v in doc.values():
            yield from function_refs(v)
    elif isinstance(doc, (list, tuple)):
        for v in doc:
            yield from function_refs(v)


def module_file(yaml_path: Path, ref: str) -> Path | None:
    """The file lm-eval imports for `!function ref` in `yaml_path` when it exists (its step 1)."""
    mod, _, _ = ref.rpartition(".")
    return (yaml_path.parent / f"{mod.replace('.', '/')}.py").resolve() if mod else None


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def code_problems(task: str, paths: tuple[Path, ...]) -> list[QevalError]:
    """A found task's YAML files and `!function` modules that lie outside the named folders."""
    roots = [TASKS_DIR.resolve(), *(Path(p).resolve() for p in paths)]
    out: list[QevalError] = []
    seen: set[Path] = set()
    for _, _, _, files in task_members(task, paths):
        for f in files:
            real = Path(f).resolve()
            if real in seen:
                continue
            seen.add(real)
            if not _inside(real, roots):
                out.append(QevalError(f"task {task} reads YAML", str(f), "a file inside a folder named with "
                                      "--include-path (lm-eval imports its !function modules: it is code)",
                                      "name its folder with --include-path too, or copy it into a named folder"))
                continue
            for ref in function_refs(load_yaml(real, "task")):
                module = module_file(real, ref)
                if module is None or not module.is_file() or not _inside(module, roots):
                    shown = f"{ref.rpartition('.')[0].replace('.', '/')}.py" if module is not None else "module.py"
                    out.append(QevalError(f"task {task} !function in {real}", ref,
                                          f"a module file {shown} beside the YAML, inside a folder named with --include-path",
                                          "put the module there; qeval does not let lm-eval import it from elsewhere "
                                          "(the working directory, sys.path)"))
    return out


def folder_problems(folder: Path) -> list[QevalError]:
    """The YAML under a named folder that the hardened loader refuses (size, encoding, aliases,
    depth, duplicate keys): lm-eval indexes every YAML of the folder, so each is checked first."""
    return entries_problems(folder)
