"""Suites: named lists of lm-eval tasks with their limits and few-shot settings.

A suite is a YAML file (data, not code). Its tasks are lm-eval task YAML that qeval can find
offline -- the ones it ships (`suites/tasks/`, data built from packaged third-party text)
or the user's own, in folders named by `--include-path` / `include_path:` -- or any lm-eval built-in
task name (these download datasets, so they need the network). A task's fingerprint hashes its YAML,
the helper modules it imports and the data files it reads, wherever they are.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from qeval.core import env
from qeval.core.errors import QevalError, did_you_mean, unknown_name
from qeval.core.files import sha256_file
from qeval.core.config import from_mapping, load_yaml, raise_if

SUITES_DIR = env.SHIPPED_SUITES
TASKS_DIR = SUITES_DIR / "tasks"


def __getattr__(name: str):
    if name == "DATA_DIR":  # built suite data: user-writable, outside the package
        from qeval.data.suite_data import suite_data_dir

        return suite_data_dir()
    raise AttributeError(name)


@dataclass(frozen=True)
class TaskSpec:
    task: str
    limit: int | None = None  # first N documents (shipped data is pre-shuffled and stratified)
    num_fewshot: int = 0
    batch_size: int | str = 1  # or "auto": lm-eval's largest-that-fits probe (for CUDA; CPU never runs out)
    divergence: bool = False  # also measure KL / top-1 agreement vs the baseline on this task's tokens
    # the headline metric for the report and the nightly's recovery gates (default: the first metric
    # of the task's metric_list under its first filter; a group: the first of its aggregate_metric_list).
    # A filtered metric reads `metric,filter`, e.g. exact_match,flexible-extract
    primary_metric: str | None = None
    # chat models: lm-eval's own settings, passed through (part of the cell key when set)
    apply_chat_template: bool | str = False  # True: the tokenizer's default template; a string: its name
    fewshot_as_multiturn: bool = False  # few-shot examples as alternating user/assistant turns
    system_instruction: str | None = None  # a system message (inside the template when one is applied)

    def problems(self, where: str) -> list[QevalError]:
        out = []
        if self.limit is not None and self.limit < 1:
            out.append(QevalError(f"{where}.limit", self.limit, "a positive number of documents or no limit"))
        if self.num_fewshot < 0:
            out.append(QevalError(f"{where}.num_fewshot", self.num_fewshot, "0 or more"))
        if (self.batch_size != "auto") if isinstance(self.batch_size, str) else self.batch_size < 1:
            out.append(QevalError(f"{where}.batch_size", self.batch_size, "1 or more, or auto"))
        # divergence works at any batch size (qeval.eval.lm.QevalLM hands it each row, padding cut off);
        # the reference is recorded at the task's batch size, which is part of the task key
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            out.append(QevalError(f"{where}.fewshot_as_multiturn", True, "apply_chat_template set too",
                                  "add apply_chat_template: true (lm-eval needs a chat template for turns)"))
        return out

    def key_settings(self) -> dict:
        """Settings beyond the base ones that change what the task computes, for the cell key: only
        those set, so that keys of tasks without them stay what they were."""
        out = {}
        for name in ("primary_metric", *CHAT_SETTINGS):
            if getattr(self, name) not in (False, None):
                out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class SuiteFile:
    name: str
    tasks: tuple[dict, ...]
    description: str = ""
    include_path: str | tuple[str, ...] = ()  # folders with the user's task YAML, relative to this file
    # suite-wide chat settings, the default of each task entry (a task's own setting wins)
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[TaskSpec, ...]
    path: Path | None = None
    include_paths: tuple[Path, ...] = ()  # absolute folders searched for task YAML after the shipped ones

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.task == name)


CHAT_SETTINGS = ("apply_chat_template", "fewshot_as_multiturn", "system_instruction")


@functools.cache
def _entries(folder: Path) -> dict[str, tuple[str, Path | None, dict, tuple[str, ...]]]:
    """name -> (kind, YAML path, config, members) for the tasks, groups and tags (lm-eval's three
    kinds of names) of a folder. A group's members are the names (or inline configs' names) in its
    `task:` list; a tag's members are the tasks that carry it."""
    out: dict = {}
    tags: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.yaml")):
        try:
            doc = load_yaml(path, "task")
        except QevalError:
            continue  # not every YAML in a user's folder is a task; a named task is checked later
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


def shipped_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def load_suite(name_or_path: str, extra_paths: tuple[Path, ...] = ()) -> Suite:
    """Load a suite by shipped name (`default`) or YAML path; validates every task name."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        known = shipped_suites()
        if name_or_path not in known:
            raise unknown_name("suite", name_or_path, known,
                               "or pass a suite YAML path; or --tasks for lm-eval task names")
        path = known[name_or_path]
    raw = load_yaml(path, "suite")
    errors: list[QevalError] = []
    sf = from_mapping(SuiteFile, raw, f"suite {path.name}", errors)
    specs = []
    # Check the task entries even when the top level has problems: report everything in one pass.
    tasks = raw.get("tasks") if isinstance(raw, dict) else None
    chat = {k: getattr(sf, k) for k in CHAT_SETTINGS if sf is not None and getattr(sf, k) not in (False, None)}
    for i, t in enumerate(tasks if isinstance(tasks, list) else []):
        where = f"suite {path.name} tasks[{i}]"
        spec = from_mapping(TaskSpec, {**chat, **t} if isinstance(t, dict) else t, where, errors)
        if spec is not None:
            errors += spec.problems(where)
            specs.append(spec)
    if isinstance(tasks, list) and not tasks:
        errors.append(QevalError(f"suite {path.name}", "tasks: []", "at least one task", "name a task"))
    raise_if(errors)
    paths = include_paths(sf.include_path, path.parent, f"suite {path.name} include_path")
    suite = Suite(sf.name, sf.description, tuple(specs), path, tuple(dict.fromkeys(paths + tuple(extra_paths))))
    validate_tasks(suite)
    return suite


def with_chat_defaults(suite: Suite, defaults) -> Suite:
    """`suite` with a plan's chat settings (`defaults`: any object with the CHAT_SETTINGS
    attributes) on every task that does not set its own."""
    import dataclasses

    chat = {k: getattr(defaults, k) for k in CHAT_SETTINGS if getattr(defaults, k, None) not in (False, None)}
    if not chat:
        return suite
    tasks = tuple(dataclasses.replace(t, **{k: v for k, v in chat.items() if getattr(t, k) in (False, None)})
                  for t in suite.tasks)
    errors = [e for i, t in enumerate(tasks) for e in t.problems(f"suite {suite.name} tasks[{i}]")]
    raise_if(errors)
    return dataclasses.replace(suite, tasks=tasks)


def suite_from_tasks(names: list[str], limit: int | None, num_fewshot: int, batch_size: int,
                     paths: tuple[Path, ...] = ()) -> Suite:
    """An ad-hoc suite from `--tasks a,b` on the command line."""
    suite = Suite("adhoc:" + ",".join(names), "tasks named on the command line",
                  tuple(TaskSpec(n, limit, num_fewshot, batch_size) for n in names), None, tuple(paths))
    raise_if(suite.tasks[0].problems("--tasks") if suite.tasks else
             [QevalError("--tasks", "", "at least one task name")])
    validate_tasks(suite)
    return suite


def validate_tasks(suite: Suite) -> None:
    """Every task must be found offline (shipped or under an include path) or be an lm-eval built-in
    while online; a found task's YAML and data are checked too. Reports all problems at once."""
    shipped = find_tasks(suite.include_paths)
    if any(t.task in shipped_tasks() for t in suite.tasks):
        from qeval.data.suite_data import ensure_built

        ensure_built()  # a fresh install or cache: build the shipped data before checking it
    from qeval.data.mirror import missing_line, mirror_root, split_files, dataset_folder

    root = mirror_root()
    errors = []

    def check_mirrored(name: str) -> None:
        """Offline, every hub dataset the task reads must be in the mirror: one line per missing one."""
        for path, ds in task_datasets(name, suite.include_paths):
            if root is None or not split_files(dataset_folder(root, path, ds)):
                errors.append(missing_line(root, path, ds, name))

    for t in suite.tasks:
        if t.task in shipped:
            try:
                check_task(t.task, shipped[t.task])
                if env.is_offline():
                    check_mirrored(t.task)
                if t.primary_metric is not None:
                    known = metric_ids(t.task, suite.include_paths)
                    if known and t.primary_metric not in known:
                        errors.append(unknown_name(f"task {t.task} primary_metric", t.primary_metric, known,
                                                   "filtered metrics read metric,filter"))
            except QevalError as e:
                errors.extend(getattr(e, "errors", [e]))
            continue
        if env.is_offline() and root is not None and t.task in builtin_tasks():
            check_mirrored(t.task)  # a built-in task served from the mirror
        elif env.is_offline():
            hint = did_you_mean(t.task, shipped)
            errors.append(QevalError(
                "task", t.task, "a task YAML found offline (" + ", ".join(shipped) + ")",
                (hint + " " if hint else "") + "for your own task YAML pass --include-path DIR (or "
                "include_path: in the suite or plan); lm-eval built-in tasks download their data: unset "
                "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE on a machine with network access to use them"))
        elif t.task not in builtin_tasks():
            errors.append(unknown_name("task", t.task, list(shipped) + builtin_tasks(),
                                       "`qeval suites` lists the shipped ones"))
    if len({t.task for t in suite.tasks}) != len(suite.tasks):
        errors.append(QevalError("suite", suite.name, "each task at most once", "remove the duplicate"))
    raise_if(errors)


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
                        out.append(a["metric"] if f == "none" else f"{a['metric']},{f}")
            return out
        return []
    metrics = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
    if not metrics or not all(isinstance(m, str) for m in metrics):
        return []
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
    return [m if f == "none" else f"{m},{f}" for m in metrics for f in filters]


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
