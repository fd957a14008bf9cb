"""Stage: evaluate a loaded model on one task through lm-eval (the only module importing lm_eval).

`evaluate()` wraps the already-loaded model in lm-eval's `HFLM` (no second load), runs
`simple_evaluate` with per-sample logging, and returns an `EvalOutcome` with the aggregate metrics,
their standard errors (bootstrapped here over documents where lm-eval reports none, e.g. perplexity)
and a compact per-sample list that later stages use for flips and paired statistics.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qeval.eval.divergence import Capture, Divergence, Reference
from qeval.core.names import metric_id  # noqa: F401  (re-exported: the id lm-eval results use)
from qeval.core.errors import QevalError
from qeval.models.memory import PeakMemory
from qeval.data.mirror import mirror_root, serving
from qeval.models.load import LoadedModel
from qeval.eval.suites import TASKS_DIR, TaskSpec, find_tasks


# The scoring code path's version, part of every evaluation key (EvalSpec -> runner.make_cells).
# 2: qeval.eval.lm.QevalLM (head only on the positions read, longest-first rolling batches) rounds
# differently from lm-eval's full-logits path at float tolerance, so records of the two don't mix.
# 3: the choices of one context scored in one row (tree mask), rounding differently again.
HARNESS_VERSION = 3


@dataclass(frozen=True)
class EvalSpec:
    """Evaluation settings that are the same for every task of a run."""

    seed: int = 1234
    bootstrap_iters: int = 1000  # for stderr of metrics lm-eval gives none for (perplexities)
    harness: int = HARNESS_VERSION


@dataclass
class Metric:
    value: float
    stderr: float | None
    higher_is_better: bool
    aggregation: str | None = None  # lm-eval's aggregation function (its registry name): picks the paired test


@dataclass
class SubtaskOutcome:
    """One subtask (or nested group) of a group: its metrics, headline metric and document count."""

    metrics: dict[str, Metric]
    primary: str
    n: int
    group: bool = False


@dataclass
class EvalOutcome:
    task: str
    metrics: dict[str, Metric]
    primary: str  # the task's headline metric (first in its metric_list)
    n: int
    samples: list[dict]
    eval_s: float
    peak_bytes: int
    config: dict = field(default_factory=dict)
    reference: Reference | None = None  # captured baseline hidden states (divergence="reference")
    divergence: Divergence | None = None  # comparison with a reference (divergence=Reference)
    divergence_note: str = ""
    subtasks: dict[str, SubtaskOutcome] = field(default_factory=dict)  # a group's members, by name
    divergence_s: float = 0.0  # of eval_s, in the divergence hooks (KL + reference reads, or recording it)

    def subtasks_record(self) -> dict:
        """The subtasks as stored in a record (plain data)."""
        import dataclasses

        return {name: {"metrics": {k: dataclasses.asdict(v) for k, v in sub.metrics.items()},
                       "primary_metric": sub.primary, "n": sub.n, "group": sub.group}
                for name, sub in self.subtasks.items()}


@functools.cache
def task_manager(include_defaults: bool, paths: tuple[Path, ...] = ()):
    from lm_eval.tasks import TaskManager

    # Without the built-ins, indexing takes 0.1 s instead of ~15 s.
    return TaskManager(include_defaults=include_defaults, include_path=[str(TASKS_DIR), *map(str, paths)])


@contextlib.contextmanager
def quiet_lm_eval():
    """bitsandbytes logs on every int8 matmul that fp32 inputs are cast to fp16; that is the format's
    documented behaviour (README, formats), not news for each of thousands of calls. Muted for the
    evaluation only (levels restored after), and not at all with -v."""
    names = ("bitsandbytes", "lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.models.huggingface")
    if logging.getLogger("qeval").isEnabledFor(logging.DEBUG):
        yield
        return
    old = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in old.items():
            logging.getLogger(n).setLevel(level)


def _quiet_git() -> None:
    """lm-eval records its git hash by running `git describe` with stderr inherited: outside a
    checkout (an installed qeval, any user folder) that prints "fatal: not a git repository" into
    every run. Same value, stderr silenced."""
    import subprocess

    import lm_eval.evaluator as ev

    def git_hash():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None

    ev.get_git_commit_hash = git_hash


@contextlib.contextmanager
def _in_folder(folder: Path | None):
    """Run a found task from its YAML's folder, so relative data paths in it (the datasets library
    resolves them against the working directory) mean "beside the YAML" wherever qeval runs."""
    if folder is None:
        yield
        return
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


_FAST_PATHS = True  # scripts/eval_speed.py turns these off to time the path as it was


@functools.lru_cache(maxsize=1024)
def _template(source: str):
    from lm_eval.utils import env

    return env.from_string(source)


def _apply_template(template: str, doc: dict) -> str:
    return _template(template).render(**doc)


@contextlib.contextmanager
def _lm_eval_fast_paths():
    """Two costs lm-eval pays on every simple_evaluate call, switched off for the call:
    - it collects torch's environment report (subprocesses: pip list, lscpu, nvidia-smi; ~1 s on
      2 cores) into results qeval never reads (records carry qeval's own versions and device);
    - it compiles each Jinja prompt template anew for every document and choice (`from_string`
      has no cache): compiled once here, rendering unchanged."""
    import lm_eval.evaluator as ev
    import lm_eval.utils as lu

    if not _FAST_PATHS:
        yield
        return
    saved = ev.add_env_info, lu.apply_template
    ev.add_env_info, lu.apply_template = (lambda storage: None), _apply_template
    try:
        yield
    finally:
        ev.add_env_info, lu.apply_template = saved


def evaluate(loaded: LoadedModel, task: TaskSpec, spec: EvalSpec,
             divergence: str | Reference | None = None, paths: tuple[Path, ...] = (),
             recorder: list | None = None) -> EvalOutcome:
    """Run one lm-eval task on `loaded`; return metrics, stderr, per-sample outputs, time, memory.

    `divergence="reference"` also captures the model's hidden states on the task's forwards (the
    baseline); a `Reference` instead compares every forward with it (KL, top-1 agreement).
    `recorder` (a list) receives the inputs of every forward and generate call (for `qeval bench`).
    """
    from lm_eval import simple_evaluate

    from qeval.eval.lm import QevalLM

    _quiet_git()
    found = find_tasks(paths)
    capture = None if divergence is None else Capture(loaded.model, None if divergence == "reference" else divergence)
    with quiet_lm_eval():  # HFLM warns at every construction that it was handed a loaded model: it was
        lm = QevalLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=task.batch_size,
                     device=loaded.device, observer=capture, recorder=recorder)
    if lm._split is None and capture is not None:
        capture_ctx = capture  # a model qeval cannot split into body + head: module hooks instead
    else:
        capture_ctx = contextlib.nullcontext()
    folder = found[task.task].parent if task.task in found else None
    chat = {"apply_chat_template": task.apply_chat_template, "fewshot_as_multiturn": task.fewshot_as_multiturn,
            "system_instruction": task.system_instruction}
    with PeakMemory(loaded.device) as peak, capture_ctx, _lm_eval_fast_paths(), quiet_lm_eval(), _in_folder(folder), \
            serving(mirror_root(), task.task):
        t0 = time.perf_counter()
        res = simple_evaluate(
            model=lm, tasks=[task.task], task_manager=task_manager(task.task not in found, tuple(paths)),
            limit=task.limit, num_fewshot=task.num_fewshot, log_samples=True,
            bootstrap_iters=spec.bootstrap_iters, random_seed=spec.seed, numpy_random_seed=spec.seed,
            torch_random_seed=spec.seed, fewshot_random_seed=spec.seed, **chat)
        eval_s = time.perf_counter() - t0
    outcome = _outcome(task.task, res, spec, eval_s, peak.peak_bytes, task.primary_metric)
    if capture is not None:
        outcome.divergence_s = capture.seconds
        if capture.batched:
            outcome.divergence_note = (f"{capture.batched} forwards held several sequences: divergence needs "
                                       "batch_size 1 for this task")
        elif divergence == "reference":
            outcome.reference = capture.reference()
        else:
            outcome.divergence = capture.result()
            if capture.unmatched:
                outcome.divergence_note = f"{capture.unmatched} windows unknown to the reference were left out"
    return outcome


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not (isinstance(x, float) and math.isnan(x))


def _aggregations() -> tuple[dict, dict]:
    """lm-eval's aggregation registry (name -> function) and its metric -> default aggregation map."""
    import lm_eval.api.metrics  # noqa: F401  (registers them)
    from lm_eval.api.registry import AGGREGATION_REGISTRY, METRIC_AGGREGATION_REGISTRY

    return AGGREGATION_REGISTRY, METRIC_AGGREGATION_REGISTRY


def _aggregation(config: dict, metric: str) -> tuple[str | None, object]:
    """(registry name, function) of how lm-eval aggregates `metric` in a task: the metric_list's
    `aggregation` (a name, or a function qeval can only name when lm-eval registers it), else the
    metric's default."""
    by_name, defaults = _aggregations()
    entry = next((e for e in config.get("metric_list") or [] if e.get("metric") == metric), {})
    fn = entry.get("aggregation")
    if isinstance(fn, str) and fn in by_name:
        return fn, by_name[fn]
    if fn is None or isinstance(fn, str):
        fn = defaults.get(metric)
    if callable(fn):
        name = next((k for k, f in by_name.items() if f is fn), None)
        return name, fn
    return None, None


def _metric_order(config: dict, ids: list[str]) -> list[str]:
    """The metric ids in the task's metric_list order (then filter order as lm-eval reports them)."""
    names = [e.get("metric") for e in config.get("metric_list") or [] if isinstance(e.get("metric"), str)]
    rank = {n: i for i, n in enumerate(names)}
    return sorted(ids, key=lambda k: (rank.get(k.split(",")[0], len(rank)), ids.index(k)))


def _outcome(task: str, res: dict, spec: EvalSpec, eval_s: float, peak_bytes: int,
             primary_metric: str | None = None) -> EvalOutcome:
    """lm-eval's results -> metrics per (task or subtask, filter, metric), compact samples.

    A group's own metrics are lm-eval's aggregate (size-weighted or not, as its
    aggregate_metric_list says); each member is kept in `subtasks`. Samples are one entry per
    document (per subtask for a group, tagged with it), with each metric's per-document value under
    its metric id."""
    results, configs = res["results"], res.get("configs", {})
    hib_all = res.get("higher_is_better", {})
    children = res.get("group_subtasks", {})

    def leaves(name: str) -> list[str]:
        if name in children:
            return [x for c in children[name] for x in leaves(c)]
        return [name]

    members = []  # every group or task under `task`, depth first
    def walk(name: str):
        for c in children.get(name, []):
            members.append(c)
            walk(c)
    walk(task)
    is_group = task in children
    # compact samples: one entry per (leaf task, document), every filter's metrics merged into it
    samples: list[dict] = []
    leaf_samples: dict[str, list[dict]] = {}
    for leaf in leaves(task):
        by_doc: dict[int, dict] = {}
        for s in res["samples"].get(leaf, []):
            entry = by_doc.get(int(s["doc_id"]))
            if entry is None:
                entry = by_doc[int(s["doc_id"])] = _compact(s, [])
                if is_group:
                    entry["task"] = leaf
            for m in s.get("metrics") or []:
                entry[metric_id(m, s.get("filter", "none"))] = _plain(s.get(m))
        leaf_samples[leaf] = list(by_doc.values())
        samples += leaf_samples[leaf]

    def metrics_of(name: str) -> dict[str, Metric]:
        agg = results.get(name, {})
        config = configs.get(name) or configs.get(leaves(name)[0], {})
        hib = hib_all.get(name, {})
        out: dict[str, Metric] = {}
        ids = []
        for key, value in agg.items():
            if "," not in key or "_stderr," in key or not _num(value):
                continue
            m, filt = key.split(",", 1)
            ids.append((metric_id(m, filt), m, filt, value))
        order = _metric_order(config, [i for i, *_ in ids])
        for mid, m, filt, value in sorted(ids, key=lambda t: order.index(t[0])):
            agg_name, fn = _aggregation(config, m)
            stderr = agg.get(f"{m}_stderr,{filt}")
            if not _num(stderr) and name not in children and fn is not None:
                items = [s[mid] for s in leaf_samples.get(name, []) if mid in s]
                stderr = _bootstrap_stderr([_tuple(x) for x in items], fn, spec)
            out[mid] = Metric(float(value), float(stderr) if _num(stderr) else None, bool(hib.get(m, True)), agg_name)
        return out

    def primary_of(name: str, metrics: dict, override: str | None) -> str:
        if override:
            if override not in metrics:
                raise QevalError(f"task {name} primary_metric", override, "one of " + ", ".join(metrics),
                                 "name a metric the task reports (filtered metrics read metric,filter)")
            return override
        if not metrics:
            raise QevalError(f"task {name}", "no numeric metric", "a task that reports at least one number",
                             "check the task's metric_list")
        return next(iter(metrics))

    metrics = metrics_of(task)
    primary = primary_of(task, metrics, primary_metric)
    subtasks = {}
    for name in members:
        sub = metrics_of(name)
        if sub:
            n = sum(len(leaf_samples.get(x, [])) for x in leaves(name))
            subtasks[name] = SubtaskOutcome(sub, primary if primary in sub else next(iter(sub)), n, name in children)
    config = configs.get(task) or configs.get(leaves(task)[0], {})
    return EvalOutcome(task, metrics, primary, len(samples), samples, eval_s, peak_bytes,
                       config={k: config.get(k) for k in ("output_type", "num_fewshot", "doc_to_text")
                               if isinstance(config.get(k), (str, int, type(None)))},
                       subtasks=subtasks)


def _plain(v):
    """A per-document metric value as JSON data: numbers stay numbers, tuples become lists."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v) if isinstance(v, (float, np.floating)) else int(v)
    return v if v is None or isinstance(v, str) else str(v)


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


def _bootstrap_stderr(items: list, aggregate, spec: EvalSpec) -> float | None:
    """Std. dev. of the aggregate over documents resampled with replacement (fixed seed)."""
    if len(items) < 2:
        return None
    rng = np.random.default_rng(spec.seed)
    n = len(items)
    stats = [aggregate([items[i] for i in rng.integers(0, n, n)]) for _ in range(spec.bootstrap_iters)]
    return float(np.std(stats, ddof=1))


def _compact(sample: dict, metric_names: list[str]) -> dict:
    """Keep what paired statistics need (ids, per-choice log-likelihoods, per-metric values), not
    the documents and prompts themselves, which the task's data file already holds."""
    resps = []
    for r in sample.get("filtered_resps", []):
        resps.append(float(r[0]) if isinstance(r, (list, tuple)) else (float(r) if isinstance(r, (int, float)) else str(r)))
    target = sample.get("target")
    if isinstance(target, str) and len(target) > 64:  # a whole document: its doc_hash identifies it
        target = None
    out = {"doc_id": int(sample["doc_id"]), "doc_hash": sample.get("doc_hash"), "target": target,
           "resps": resps}
    for m in metric_names:
        out[m] = _plain(sample.get(m))
    return out
