"""Tasks: find lm-eval task YAML offline (shipped and under include paths), walk groups to their
members, and fingerprint what defines a task's documents and scoring (its YAML, the helper modules
its `!function` tags import, the data files it reads, mirrored datasets).

Split from `qeval.eval.suites` (a suite is a list of these tasks with its settings)."""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

from qeval.core import env
from qeval.core.config import load_yaml, raise_if
from qeval.core.errors import QevalError
from qeval.core.files import sha256_file
from qeval.core.names import metric_id
from qeval.core.yaml_safe import HostileYaml

SUITES_DIR = env.SHIPPED_SUITES
TASKS_DIR = SUITES_DIR / "tasks"

def _entries(folder: Path, problems: list[QevalError] | None = None) -> dict[str, tuple[str, Path | None, dict, tuple[str, ...]]]:
    """name -> (kind, YAML path, config, members) for the tasks, groups and tags (lm-eval's three
    kinds of names) of a folder. A group's members are the names (or inline configs' names) in its
    `task:` list; a tag's members are the tasks that carry it. A YAML the hardened loader refuses as
    hostile (size, encoding, aliases, depth, duplicate keys) is appended to `problems`."""
    out: dict = {}
    tags: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            doc = load_yaml(path, "task")
        except HostileYaml as e:
            if problems is not None:  # lm-eval indexes every YAML of the folder: refused before it does
                problems.extend(getattr(e, "errors", [e]))
            continue
        except QevalError:
            continue  # not every YAML in a user's folder is a task (lm-eval skips it too); a named task is checked later
        if not isinstance(doc, dict):
            continue
        if isinstance(doc.get("group"), str) and isinstance(doc.get("task"), list):
            members = tuple(m if isinstance(m, str) else str((m or {}).get("task", "")) for m in doc["task"])
            out.setdefault(doc["group"], ("group", path, doc, members))
        elif isinstance(doc.get("task"), str):
            out.setdefault(doc["task"], ("task", path, doc, ()))
            tag = doc.get("tag")
            for t in [tag] if isinstance(tag, str) else (tag if isinstance(tag, list) else []):
                if isinstance(t, str):
                    tags.setdefault(t, []).append(doc["task"])
    for tag, members in tags.items():
        if tag not in out:  # a tag names the tasks that carry it (lm-eval resolves it the same way)
            out[tag] = ("tag", out[members[0]][1], {}, tuple(members))
    return out


def entries_problems(folder: Path) -> list[QevalError]:
    """The hostile YAML files of a folder (qeval.eval.task_code checks the named folders with it)."""
    problems: list[QevalError] = []
    _entries(folder, problems)
    return problems


@functools.cache
def _index(folder: Path) -> dict[str, Path]:
    """name -> YAML path (a tag: its first task's YAML) for everything `_entries` finds."""
    return {name: e[1] for name, e in _entries(folder).items()}


def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML path for every lm-eval task YAML qeval ships."""
    return _index(TASKS_DIR)


def include_paths(values, base: Path | None, where: str) -> tuple[Path, ...]:
    """Validate `include_path` values (a string or a list); relative ones are relative to `base`."""
    if isinstance(values, (str, Path)):
        values = [values]
    out = []
    for v in values:
        p = Path(v).expanduser()
        if not p.is_absolute():
            p = (base or Path.cwd()) / p
        if not p.is_dir():
            raise QevalError(where, str(v), "an existing folder of lm-eval task YAML", "check the path")
        out.append(p.resolve())
    return tuple(out)


def find_tasks(paths: tuple[Path, ...] = ()) -> dict[str, Path]:
    """Task name -> YAML path: the shipped tasks, then those under each include path."""
    out = dict(shipped_tasks())
    for folder in paths:
        for name, yaml_path in _index(folder).items():
            if name in out and out[name] != yaml_path:
                raise QevalError("task name", name, f"one definition (found in {out[name]} and {yaml_path})",
                                 "rename the task in your YAML")
            out[name] = yaml_path
    return out


@functools.cache
def builtin_tasks() -> list[str]:
    return sorted(_builtin_index())  # indexing every built-in takes ~15 s: only when needed


def _resolved(yaml_path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict, list[Path]]:
    """A task YAML with its `include:`s merged in (the including file wins, as in lm-eval), and
    the files read on the way."""
    doc = load_yaml(yaml_path, "task")
    if not isinstance(doc, dict):
        return {}, [yaml_path]
    files, merged = [yaml_path], {}
    inc = doc.get("include")
    for name in [inc] if isinstance(inc, str) else (inc if isinstance(inc, list) else []):
        p = Path(name) if Path(name).is_absolute() else yaml_path.parent / name
        if p.is_file() and p not in seen:
            sub, sub_files = _resolved(p, seen + (yaml_path,))
            merged.update(sub)
            files += sub_files
    merged.update({k: v for k, v in doc.items() if k != "include"})
    return merged, files


def _members(name: str, paths: tuple[Path, ...]) -> list[tuple[str, Path, dict, list[Path]]]:
    """Every task config a found name stands for (itself; a group's or tag's members, recursively):
    (task name, YAML path, resolved config, files read)."""
    entries: dict = {}
    for folder in (TASKS_DIR, *paths):
        for k, e in _entries(folder).items():
            entries.setdefault(k, e)
    out, seen = [], set()

    def walk(n: str, inline: dict | None = None):
        if n in seen:
            return
        seen.add(n)
        e = entries.get(n)
        if e is None:
            return
        kind, path, doc, members = e
        if kind == "task":
            cfg, files = _resolved(path)
            out.append((n, path, cfg, files))
        else:
            if kind == "group":
                out.append((n, path, {}, [path]))
                for m in doc.get("task") or []:
                    if isinstance(m, dict):  # an inline task config inside the group YAML
                        out.append((str(m.get("task", "")), path, m, []))
            for m in members:
                walk(m)

    walk(name)
    return out


def task_members(name: str, paths: tuple[Path, ...] = ()) -> list[tuple[str, Path, dict, list[Path]]]:
    """Every task config a found name stands for: (task name, YAML path, resolved config, files read)."""
    return _members(name, paths)


def metric_ids(name: str, paths: tuple[Path, ...] = ()) -> list[str]:
    """The metric ids a found task or group reports, from its YAML: each metric of its
    metric_list under each filter of its filter_list (`metric` for lm-eval's filter "none",
    `metric,filter` otherwise); a group: its aggregate_metric_list. Empty where the YAML does not
    say (a Python task, metrics from process_results)."""
    found = _members(name, paths)
    if not found:
        return []
    _, path, cfg, _ = found[0]
    if not cfg:  # a group or tag: its own aggregates, or (a tag) whatever its members report
        doc = load_yaml(path, "task") if path is not None else {}
        aggs = doc.get("aggregate_metric_list") if isinstance(doc, dict) and doc.get("group") == name else None
        if isinstance(aggs, list):
            out = []
            for a in aggs:
                if isinstance(a, dict) and isinstance(a.get("metric"), str):
                    filters = a.get("filter_list") or ["none"]
                    for f in [filters] if isinstance(filters, str) else filters:
                        out.append(metric_id(a["metric"], f))
            return out
        return []
    metrics = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
    if not metrics or not all(isinstance(m, str) for m in metrics):
        return []
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
    return [metric_id(m, f) for m in metrics for f in filters]


def task_datasets(name: str, paths: tuple[Path, ...] = ()) -> list[tuple[str, str | None]]:
    """The hub datasets (dataset_path, dataset_name) a task, group or tag reads: from its YAML when
    found offline, else from lm-eval's built-in index (indexing it takes ~15 s: only asked for when
    a data mirror is in use)."""
    from qeval.data.mirror import is_hub_dataset

    if name in find_tasks(paths):
        configs = [(cfg, yaml_path.parent) for _, yaml_path, cfg, _ in _members(name, paths)]
    else:
        configs = [(cfg, None) for cfg in _builtin_configs(name)]
    out = []
    for cfg, folder in configs:
        path = cfg.get("dataset_path")
        if folder is not None and isinstance(path, str) and (folder / path).exists():
            continue  # a local dataset folder beside the YAML (lm-eval runs the task from there)
        if isinstance(path, str) and is_hub_dataset(path) and not cfg.get("custom_dataset"):
            ds = cfg.get("dataset_name")
            out.append((path, ds if isinstance(ds, str) else None))
    return list(dict.fromkeys(out))


@functools.cache
def _builtin_index():
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    return TaskIndex.build([Path(lm_eval.tasks.__file__).parent])


def _builtin_configs(name: str) -> list[dict]:
    """Resolved configs of a built-in task, group or tag (members recursively)."""
    index = _builtin_index()
    out, seen = [], set()

    def walk(n: str):
        if n in seen or n not in index:
            return
        seen.add(n)
        e = index[n]
        kind = e.kind.name
        if kind in ("TASK", "PY_TASK"):
            out.append(e.cfg or {})
        elif kind == "GROUP":
            for m in (e.cfg or {}).get("task") or []:
                if isinstance(m, str):
                    walk(m)
                elif isinstance(m, dict):
                    out.append(m)
        else:  # a tag
            for m in sorted(e.tags):
                walk(m)

    walk(name)
    return out


def task_fingerprint(task: str, paths: tuple[Path, ...] = ()) -> str:
    """sha256 of what defines a task's documents and scoring.

    A task, group or tag found offline (shipped or under an include path): the YAML of it and of
    every member, the YAML they include, the helper modules their `!function` tags import, the data
    files they read and, for hub datasets served from a data mirror, the mirrored files' content.
    Built-in: lm-eval's own task name (lm-eval's version is part of every result key, which covers
    its YAML), plus the mirrored files' content when a mirror serves its datasets.
    """
    from qeval.data.mirror import dataset_fingerprint, mirror_root

    found = find_tasks(paths)
    root = mirror_root()
    h = hashlib.sha256()
    if task not in found:
        h.update(f"lm_eval-builtin:{task}".encode())
        if root is None:
            return h.hexdigest()
    else:
        members = _members(task, paths)
        for name, yaml_path, cfg, files in members:
            if len(members) > 1:  # a group or tag (a single task's hash is unchanged from before groups)
                h.update(name.encode())
            for f in files:
                h.update(f.read_bytes())
            if not files:  # an inline config in a group YAML (hashed with it)
                continue
            for module in helper_modules(yaml_path):
                h.update(module.read_bytes())
            for data in data_files(cfg, yaml_path):
                if not data.is_file():
                    raise QevalError(f"task {task} data file", str(data), "an existing file",
                                     "run `qeval setup` for shipped tasks, or fix dataset_kwargs in " + yaml_path.name)
                h.update(sha256_file(data).encode())
    if root is not None:
        for path, name in task_datasets(task, paths):
            fp = dataset_fingerprint(root, path, name)
            if fp is not None:
                h.update(f"mirror:{path}/{name}:{fp}".encode())
    return h.hexdigest()


_FUNCTION = re.compile(r"!function\s+([\w.]+)\.\w+")


def helper_modules(yaml_path: Path) -> list[Path]:
    """The .py files beside the YAML that its `!function module.name` tags import."""
    names = sorted(set(_FUNCTION.findall(yaml_path.read_text(encoding="utf-8"))))
    return [yaml_path.parent / f"{n}.py" for n in names if (yaml_path.parent / f"{n}.py").is_file()]


def data_files(doc: dict, yaml_path: Path) -> list[Path]:
    """The local data files a task YAML reads: `dataset_kwargs.data_file` (qeval_data's loader) or
    `dataset_kwargs.data_files` (the datasets library's json/csv builders). A relative path is
    relative to the YAML's folder, then to the built suite data (the shipped tasks)."""
    from qeval.data.suite_data import suite_data_dir

    kwargs = doc.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        return []
    raw = [kwargs["data_file"]] if isinstance(kwargs.get("data_file"), str) else []
    files = kwargs.get("data_files")
    if isinstance(files, str):
        raw.append(files)
    elif isinstance(files, list):
        raw += [f for f in files if isinstance(f, str)]
    elif isinstance(files, dict):
        for v in files.values():
            raw += [v] if isinstance(v, str) else [f for f in (v or []) if isinstance(f, str)]
    out = []
    for r in raw:
        p = Path(r).expanduser()
        if not p.is_absolute():
            p = next((b / p for b in (yaml_path.parent, suite_data_dir()) if (b / p).is_file()), yaml_path.parent / p)
        out.append(p)
    return out


def check_task(task: str, yaml_path: Path) -> None:
    """Check a found task's data before anything loads: files exist, parse, hold the test split,
    and multiple-choice gold indices point at a choice."""
    doc = load_yaml(yaml_path, "task")
    where = f"task {task}"
    errors: list[QevalError] = []
    split = doc.get("test_split") or "test"
    for path in data_files(doc, yaml_path):
        if not path.is_file():
            errors.append(QevalError(f"{where} data file", str(path), "an existing file",
                                     "run `qeval setup` for shipped tasks, or fix dataset_kwargs in " + yaml_path.name))
            continue
        if path.suffix not in (".jsonl", ".json"):
            continue
        rows, bad = [], None
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                bad = n
                break
            if not isinstance(row, dict):
                bad = n
                break
            rows.append((n, row))
        if bad is not None:
            errors.append(QevalError(f"{where} data file {path} line", bad, "one JSON object per line",
                                     "fix or regenerate the file"))
            continue
        uses_split = "data_file" in (doc.get("dataset_kwargs") or {})
        scored = [(n, r) for n, r in rows if not uses_split or r.get("split", "test") == split]
        if not scored:
            errors.append(QevalError(f"{where} data file", str(path), f"at least one row in split {split!r}",
                                     "the file is empty or holds no test rows; add rows or fix test_split"))
            continue
        errors += _gold_problems(doc, scored, f"{where} data file {path.name}")
    raise_if(errors)


_FIELD = re.compile(r"^\{\{\s*(\w+)\s*\}\}$")


def _gold_problems(doc: dict, rows: list[tuple[int, dict]], where: str) -> list[QevalError]:
    """Multiple choice with a field for the choices and one for the gold index: each index must
    point at a choice (lm-eval would otherwise score the row silently against nothing)."""
    if doc.get("output_type") != "multiple_choice":
        return []
    m = _FIELD.match(str(doc.get("doc_to_choice", "")).strip())
    target = doc.get("doc_to_target")
    if not m or not isinstance(target, str) or not target.isidentifier():
        return []
    for n, row in rows:
        choices, gold = row.get(m.group(1)), row.get(target)
        if not isinstance(choices, list):
            continue
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            return [QevalError(f"{where} line {n} {target}", gold,
                               f"an index into its {len(choices)} choices (0..{len(choices) - 1})", "fix the row")]
    return []
