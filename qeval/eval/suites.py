"""Suites: named lists of lm-eval tasks with their limits and few-shot settings.

A suite is a YAML file (data, not code). Its tasks are lm-eval task YAML that qeval can find
offline -- the ones it ships (`suites/tasks/`, data built from packaged third-party text)
or the user's own, in folders named by `--include-path` / `include_path:` -- or any lm-eval built-in
task name (these download datasets, so they need the network). A task's fingerprint hashes its YAML,
the helper modules it imports and the data files it reads, wherever they are.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from qeval.core import env
from qeval.core.errors import QevalError, did_you_mean, unknown_name
from qeval.core.config import from_mapping, load_yaml, raise_if
from qeval.core.names import MAX_BATCH, MAX_FEWSHOT, MAX_LIMIT

# the task index lives in qeval.eval.tasks; these names are re-exported for the suite's importers
from qeval.eval.tasks import (SUITES_DIR, TASKS_DIR, builtin_tasks, check_task, data_files,  # noqa: F401
                              find_tasks, helper_modules, include_paths, metric_ids, shipped_tasks,
                              task_datasets, task_fingerprint)


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
        if self.limit is not None and not 1 <= self.limit <= MAX_LIMIT:
            out.append(QevalError(f"{where}.limit", self.limit, f"a positive number of documents up to {MAX_LIMIT:,} "
                                  "or no limit", "leave the limit out for every document"))
        if not 0 <= self.num_fewshot <= MAX_FEWSHOT:
            out.append(QevalError(f"{where}.num_fewshot", self.num_fewshot, f"0 or more, up to {MAX_FEWSHOT:,}"))
        if (self.batch_size != "auto") if isinstance(self.batch_size, str) else not 1 <= self.batch_size <= MAX_BATCH:
            out.append(QevalError(f"{where}.batch_size", self.batch_size, f"1 or more (up to {MAX_BATCH:,}), or auto"))
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

    from qeval.eval.task_code import code_problems, folder_problems

    for folder in suite.include_paths:  # every YAML lm-eval will index, checked before it does
        errors += folder_problems(folder)
    for t in suite.tasks:
        if t.task in shipped:
            try:
                errors += code_problems(t.task, suite.include_paths)
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
