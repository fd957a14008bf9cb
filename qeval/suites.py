"""Suites: named lists of lm-eval tasks with their limits and few-shot settings.

A suite is a YAML file under `suites/` (data, not code); its tasks are either qeval's shipped
lm-eval task YAML under `suites/tasks/` (offline, built from packaged third-party data) or any
lm-eval built-in task name (these download datasets, so they need the network).
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from qeval import env
from qeval.errors import QevalError, did_you_mean, unknown_name
from qeval.specs import from_mapping, load_yaml, raise_if

SUITES_DIR = env.REPO_ROOT / "suites"
TASKS_DIR = SUITES_DIR / "tasks"
DATA_DIR = SUITES_DIR / "data"


@dataclass(frozen=True)
class TaskSpec:
    task: str
    limit: int | None = None  # first N documents (shipped data is pre-shuffled and stratified)
    num_fewshot: int = 0
    batch_size: int | str = 1  # or "auto": lm-eval's largest-that-fits probe (for CUDA; CPU never runs out)
    divergence: bool = False  # also measure KL / top-1 agreement vs the baseline on this task's tokens

    def problems(self, where: str) -> list[QevalError]:
        out = []
        if self.limit is not None and self.limit < 1:
            out.append(QevalError(f"{where}.limit", self.limit, "a positive number of documents or no limit"))
        if self.num_fewshot < 0:
            out.append(QevalError(f"{where}.num_fewshot", self.num_fewshot, "0 or more"))
        if (self.batch_size != "auto") if isinstance(self.batch_size, str) else self.batch_size < 1:
            out.append(QevalError(f"{where}.batch_size", self.batch_size, "1 or more, or auto"))
        # divergence works at any batch size (qeval.lm.QevalLM hands it each row, padding cut off);
        # the reference is recorded at the task's batch size, which is part of the task key
        return out


@dataclass(frozen=True)
class SuiteFile:
    name: str
    tasks: tuple[dict, ...]
    description: str = ""


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[TaskSpec, ...]
    path: Path | None = None

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.task == name)


@functools.cache
def shipped_tasks() -> dict[str, Path]:
    """Task name -> YAML path for every lm-eval task YAML qeval ships."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        doc = load_yaml(path, "task")
        if isinstance(doc, dict) and "task" in doc:
            out[doc["task"]] = path
    return out


def shipped_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def load_suite(name_or_path: str) -> Suite:
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
    for i, t in enumerate(tasks if isinstance(tasks, list) else []):
        where = f"suite {path.name} tasks[{i}]"
        spec = from_mapping(TaskSpec, t, where, errors)
        if spec is not None:
            errors += spec.problems(where)
            specs.append(spec)
    if isinstance(tasks, list) and not tasks:
        errors.append(QevalError(f"suite {path.name}", "tasks: []", "at least one task", "name a task"))
    raise_if(errors)
    suite = Suite(sf.name, sf.description, tuple(specs), path)
    validate_tasks(suite)
    return suite


def suite_from_tasks(names: list[str], limit: int | None, num_fewshot: int, batch_size: int) -> Suite:
    """An ad-hoc suite from `--tasks a,b` on the command line."""
    suite = Suite("adhoc:" + ",".join(names), "tasks named on the command line",
                  tuple(TaskSpec(n, limit, num_fewshot, batch_size) for n in names))
    raise_if(suite.tasks[0].problems("--tasks") if suite.tasks else
             [QevalError("--tasks", "", "at least one task name")])
    validate_tasks(suite)
    return suite


def validate_tasks(suite: Suite) -> None:
    """Every task must be shipped, or an lm-eval built-in while online; report all bad names at once."""
    shipped = shipped_tasks()
    errors = []
    for t in suite.tasks:
        if t.task in shipped:
            continue
        if env.is_offline():
            hint = did_you_mean(t.task, shipped)
            errors.append(QevalError(
                "task", t.task, "a shipped offline task (" + ", ".join(shipped) + ")",
                (hint + " " if hint else "") + "lm-eval built-in tasks download their data: unset "
                "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE on a machine with network access to use them"))
        elif t.task not in builtin_tasks():
            errors.append(unknown_name("task", t.task, list(shipped) + builtin_tasks(),
                                       "`qeval suites` lists the shipped ones"))
    if len({t.task for t in suite.tasks}) != len(suite.tasks):
        errors.append(QevalError("suite", suite.name, "each task at most once", "remove the duplicate"))
    raise_if(errors)


@functools.cache
def builtin_tasks() -> list[str]:
    from lm_eval.tasks import TaskManager  # indexing every built-in takes ~15 s: only when needed

    return sorted(TaskManager().all_tasks)


def task_fingerprint(task: str) -> str:
    """sha256 of what defines a task's documents and scoring.

    Shipped: the task YAML, its helper module and the data files it reads. Built-in: lm-eval's own
    task name (lm-eval's version is part of every result key, which covers its YAML and data).
    """
    shipped = shipped_tasks()
    if task not in shipped:
        return hashlib.sha256(f"lm_eval-builtin:{task}".encode()).hexdigest()
    yaml_path = shipped[task]
    h = hashlib.sha256()
    h.update(yaml_path.read_bytes())
    h.update((TASKS_DIR / "qeval_data.py").read_bytes())
    doc = load_yaml(yaml_path, "task")
    data_file = (doc.get("dataset_kwargs") or {}).get("data_file")
    if data_file:
        manifest = json.loads((DATA_DIR / "MANIFEST.json").read_text())
        h.update(manifest[data_file]["sha256"].encode())
    return h.hexdigest()
