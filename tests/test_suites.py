"""Suites, their shipped lm-eval tasks and data (qeval/suites.py, suite_data.py, specs.py, suites/)."""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

import qeval.eval.suites as suites
from qeval.core import env
from qeval.core.errors import QevalError, QevalErrors
from qeval.core.config import load_yaml
from qeval.data.suite_data import BUILDERS, FEWSHOT_POOL, build_all
from qeval.eval.suites import (DATA_DIR, SUITES_DIR, TASKS_DIR, Suite, TaskSpec, load_suite, shipped_suites,
                          shipped_tasks, suite_from_tasks, task_fingerprint)

HEX64 = re.compile(r"^[0-9a-f]{64}$")
SUITE_YAMLS = sorted(SUITES_DIR.glob("*.yaml"))
TASK_YAMLS = sorted(TASKS_DIR.glob("*.yaml"))
N_CATEGORIES = 14


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines() if line]


# --- every shipped YAML loads --------------------------------------------------------------------

def test_shipped_files_exist():
    assert {p.stem for p in SUITE_YAMLS} >= {"default", "smoke"}
    assert {p.stem for p in TASK_YAMLS} >= {"qeval_analogy", "qeval_lee_ppl"}


@pytest.mark.parametrize("path", SUITE_YAMLS, ids=lambda p: p.name)
def test_shipped_suite_loads(path):
    by_path = load_suite(str(path))
    by_name = load_suite(path.stem)
    assert by_path.name == path.stem
    assert by_name.tasks == by_path.tasks
    assert by_path.path == path
    assert by_path.tasks, "a shipped suite with no tasks"
    for t in by_path.tasks:
        assert isinstance(t, TaskSpec)
        assert t.task in shipped_tasks(), f"{path.name} uses a task that needs the network: {t.task}"
        assert t.limit is None or t.limit > 0
        assert t.num_fewshot >= 0 and t.batch_size >= 1


def test_default_suite_settings():
    s = load_suite("default")
    assert [t.task for t in s.tasks] == ["qeval_analogy", "qeval_lee_ppl", "qeval_capitals", "qeval_similarity"]
    assert s.task("qeval_analogy") == TaskSpec("qeval_analogy", limit=300, num_fewshot=0, batch_size=32)
    assert s.task("qeval_lee_ppl") == TaskSpec("qeval_lee_ppl", limit=50, num_fewshot=0, batch_size=4, divergence=True)
    assert s.task("qeval_capitals") == TaskSpec("qeval_capitals", limit=60, num_fewshot=3, batch_size=16)
    assert s.task("qeval_similarity") == TaskSpec("qeval_similarity", limit=200, num_fewshot=0, batch_size=32)


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=str(TASKS_DIR))


def _flatten(loaded) -> dict:
    """lm-eval returns {name: Task} or, for groups, {group: {name: Task}}: flatten to tasks."""
    out = {}
    for k, v in loaded.items():
        if isinstance(v, dict):
            out.update(_flatten(v))
        else:
            out[getattr(k, "group_name", k)] = v
    return out


def test_shipped_tasks_match_lm_eval_index(task_manager):
    assert set(shipped_tasks()) == set(task_manager.all_tasks)
    assert {p.stem for p in TASK_YAMLS} == set(shipped_tasks())


def _check_analogy(task, docs):
    assert len(docs) == 19544 - FEWSHOT_POOL
    for doc in docs[:500]:
        assert doc["split"] == "test"
        assert doc["a"] and doc["b"] and doc["c"]
        assert len(doc["choices"]) == 4
        assert 0 <= doc["gold"] < 4
        assert doc["answer"] == doc["choices"][doc["gold"]]
    doc = docs[0]
    assert task.doc_to_text(doc) == f"{doc['a']} is to {doc['b']} as {doc['c']} is to"
    assert list(task.doc_to_choice(doc)) == doc["choices"]
    assert task.doc_to_target(doc) == doc["gold"]
    fewshot = list(task.fewshot_docs())
    assert len(fewshot) == FEWSHOT_POOL and {d["split"] for d in fewshot} == {"train"}


def _check_lee(task, docs):
    assert len(docs) == 50
    assert all(isinstance(d["text"], str) and d["text"].strip() for d in docs)
    assert task.doc_to_target(docs[0]) == docs[0]["text"]


CHECKS = {"qeval_analogy": _check_analogy, "qeval_lee_ppl": _check_lee}


@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.name)
def test_shipped_task_loads_in_lm_eval(task_manager, path):
    name = load_yaml(path, "task")["task"]
    loaded = _flatten(task_manager.load_task_or_group([name]))
    assert name in loaded, loaded
    task = loaded[name]
    assert task.has_test_docs()
    docs = list(task.test_docs())
    assert docs, f"{name} has no test docs"
    CHECKS.get(name, lambda t, d: None)(task, docs)


# --- analogy data ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def analogy_rows():
    return _rows("analogy.jsonl")


def test_analogy_size_and_splits(analogy_rows):
    assert len(analogy_rows) == 19544
    assert [r["id"] for r in analogy_rows] == list(range(19544))
    assert FEWSHOT_POOL == 140
    assert {r["split"] for r in analogy_rows[:140]} == {"train"}
    assert {r["split"] for r in analogy_rows[140:]} == {"test"}
    manifest = json.loads((DATA_DIR / "MANIFEST.json").read_text())
    assert manifest["analogy.jsonl"]["rows"] == len(analogy_rows)


def test_analogy_prefixes_are_stratified(analogy_rows):
    assert len({r["category"] for r in analogy_rows}) == N_CATEGORIES
    # few-shot pool: ten per category
    assert set(Counter(r["category"] for r in analogy_rows[:FEWSHOT_POOL]).values()) == {10}
    test = analogy_rows[FEWSHOT_POOL:]
    assert len({r["category"] for r in test[:N_CATEGORIES]}) == N_CATEGORIES
    # the default suite's limit (300) covers every category roughly equally
    counts = Counter(r["category"] for r in test[:300])
    assert len(counts) == N_CATEGORIES and max(counts.values()) - min(counts.values()) <= 1


def test_analogy_choices_are_valid(analogy_rows):
    for r in analogy_rows:
        choices = r["choices"]
        assert len(choices) == 4 and len(set(choices)) == 4, r
        assert 0 <= r["gold"] < 4 and choices[r["gold"]] == r["answer"], r
        distractors = [c for i, c in enumerate(choices) if i != r["gold"]]
        assert r["answer"] not in distractors, r
        assert not set(distractors) & {r["a"], r["b"], r["c"]}, r


def test_analogy_gold_positions_are_balanced(analogy_rows):
    counts = Counter(r["gold"] for r in analogy_rows)
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 0.2 * len(analogy_rows)  # no position gives the answer away


# --- deterministic data build -------------------------------------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_and_matches_shipped(tmp_path):
    ma = build_all(tmp_path / "a")
    mb = build_all(tmp_path / "b")
    names = [name for name, _ in BUILDERS.items()]
    assert set(names) == set(BUILDERS)
    shipped = json.loads((DATA_DIR / "MANIFEST.json").read_text())
    for name in names:
        ha, hb = _sha(tmp_path / "a" / name), _sha(tmp_path / "b" / name)
        assert ha == hb
        assert ma[name]["sha256"] == ha
        assert ma[name]["sources"] and all(HEX64.match(h) for h in ma[name]["sources"].values())
        assert ma[name]["rows"] == len((tmp_path / "a" / name).read_text(encoding="utf-8").splitlines())
        # the committed data is exactly what the build produces
        assert shipped[name]["sha256"] == ha
        assert shipped[name]["sources"] == ma[name]["sources"]
    assert ma == mb
    assert json.loads((tmp_path / "a" / "MANIFEST.json").read_text()) == ma
    assert (tmp_path / "a" / "MANIFEST.json").read_bytes() == (tmp_path / "b" / "MANIFEST.json").read_bytes()


def test_rebuild_rewrites_nothing_unless_changed(tmp_path):
    d = tmp_path / "data"
    build_all(d)
    files = sorted(d.iterdir())
    assert {p.name for p in files} == {*BUILDERS, "MANIFEST.json"}
    before = {p.name: p.stat().st_mtime_ns for p in files}
    build_all(d)
    assert {p.name: p.stat().st_mtime_ns for p in sorted(d.iterdir())} == before

    # a tampered output is detected by its hash and rebuilt; the other file is left alone
    good = _sha(d / "lee_news.jsonl")
    with open(d / "lee_news.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": 99, "split": "test", "text": "tampered"}\n')
    build_all(d)
    assert _sha(d / "lee_news.jsonl") == good
    assert (d / "analogy.jsonl").stat().st_mtime_ns == before["analogy.jsonl"]
    assert not list(d.glob("*.tmp"))


# --- task fingerprints ----------------------------------------------------------------------------

def test_task_fingerprints():
    fa = task_fingerprint("qeval_analogy")
    fl = task_fingerprint("qeval_lee_ppl")
    assert HEX64.match(fa) and HEX64.match(fl)
    assert task_fingerprint("qeval_analogy") == fa
    assert fa != fl
    builtin = task_fingerprint("hellaswag")
    assert HEX64.match(builtin)
    assert builtin == task_fingerprint("hellaswag")
    assert builtin not in (fa, fl) and builtin != task_fingerprint("arc_easy")


def test_task_fingerprint_follows_data_hash(tmp_path, monkeypatch):
    before = task_fingerprint("qeval_analogy")
    lee_before = task_fingerprint("qeval_lee_ppl")
    for f in DATA_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with open(tmp_path / "analogy.jsonl", "a", encoding="utf-8") as f:
        f.write("\n")  # the fingerprint hashes the data file itself, wherever it is
    monkeypatch.setenv("QEVAL_SUITE_DATA", str(tmp_path))
    assert task_fingerprint("qeval_analogy") != before
    assert task_fingerprint("qeval_lee_ppl") == lee_before  # only the changed data file counts


# --- errors ---------------------------------------------------------------------------------------

def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_unknown_suite_name_suggests_close_one():
    with pytest.raises(QevalError) as ei:
        load_suite("defualt")
    msg = str(ei.value)
    assert "'defualt'" in msg
    assert "did you mean 'default'" in msg
    assert "smoke" in msg  # lists the shipped suites
    assert "\n" not in msg


def test_missing_suite_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(QevalError) as ei:
        load_suite(str(path))
    msg = str(ei.value)
    assert repr(str(path)) in msg
    assert "existing YAML file" in msg


def test_malformed_yaml(tmp_path):
    p = _write(tmp_path, "name: [unclosed\n")
    with pytest.raises(QevalError) as ei:
        load_suite(str(p))
    msg = str(ei.value)
    assert "malformed" in msg and str(p) in msg
    assert re.search(r"line \d+", msg)
    assert "\n" not in msg


def test_malformed_yaml_names_the_right_line(tmp_path):
    p = _write(tmp_path, "name: x\ndescription: a: b\ntasks: []\n")
    with pytest.raises(QevalError) as ei:
        load_suite(str(p))
    assert "line 2" in str(ei.value)


def test_task_level_problems_reported_together(tmp_path):
    p = _write(tmp_path, "name: x\ntasks:\n  - task: qeval_analogy\n    limt: 5\n"
                         "  - task: qeval_lee_ppl\n    limit: \"ten\"\n    batch_size: true\n")
    with pytest.raises(QevalErrors) as ei:
        load_suite(str(p))
    lines = str(ei.value).splitlines()
    assert len(lines) == 3 == len(ei.value.errors)
    text = str(ei.value)
    assert "'limt'" in text and "did you mean 'limit'" in text
    assert "tasks[1].limit 'ten'" in text and "int" in text
    assert "tasks[1].batch_size True" in text


def test_all_problems_reported_together(tmp_path):
    p = _write(tmp_path, "name: x\ncolour: red\ntasks:\n  - task: qeval_analogy\n    limt: 5\n"
                         "  - task: qeval_lee_ppl\n    limit: \"ten\"\n")
    with pytest.raises(QevalErrors) as ei:
        load_suite(str(p))
    text = str(ei.value)
    assert len(text.splitlines()) >= 3
    assert "'colour'" in text and "'limt'" in text and "'ten'" in text


def test_missing_required_key(tmp_path):
    p = _write(tmp_path, "name: x\n")
    with pytest.raises(QevalError) as ei:
        load_suite(str(p))
    assert "'tasks'" in str(ei.value) and "add `tasks:`" in str(ei.value)


def test_unknown_task_offline_suggests_shipped(tmp_path):
    assert env.is_offline()
    p = _write(tmp_path, "name: x\ntasks:\n  - task: qeval_analogi\n")
    with pytest.raises(QevalError) as ei:
        load_suite(str(p))
    msg = str(ei.value)
    assert "'qeval_analogi'" in msg
    assert "did you mean 'qeval_analogy'" in msg
    assert "network" in msg and "HF_HUB_OFFLINE" in msg


def test_unknown_tasks_reported_together():
    with pytest.raises(QevalErrors) as ei:
        suite_from_tasks(["qeval_analogi", "qeval_lee"], None, 0, 1)
    text = str(ei.value)
    assert len(ei.value.errors) == 2
    assert "'qeval_analogi'" in text and "'qeval_lee'" in text


def test_duplicate_task_in_suite_file(tmp_path):
    p = _write(tmp_path, "name: dup\ntasks:\n  - task: qeval_analogy\n  - task: qeval_analogy\n    limit: 3\n")
    with pytest.raises(QevalError) as ei:
        load_suite(str(p))
    msg = str(ei.value)
    assert "'dup'" in msg and "each task at most once" in msg


def test_duplicate_task_on_command_line():
    with pytest.raises(QevalError, match="at most once"):
        suite_from_tasks(["qeval_analogy", "qeval_analogy"], 5, 0, 4)


# --- ad-hoc suites -------------------------------------------------------------------------------

def test_suite_from_tasks():
    s = suite_from_tasks(["qeval_analogy"], 5, 0, 4)
    assert isinstance(s, Suite)
    assert s.tasks == (TaskSpec("qeval_analogy", limit=5, num_fewshot=0, batch_size=4),)
    assert s.task("qeval_analogy").limit == 5
    assert s.name == "adhoc:qeval_analogy"
    assert s.path is None

    two = suite_from_tasks(["qeval_lee_ppl", "qeval_analogy"], None, 2, 1)
    assert [t.task for t in two.tasks] == ["qeval_lee_ppl", "qeval_analogy"]
    assert all(t.limit is None and t.num_fewshot == 2 and t.batch_size == 1 for t in two.tasks)


def test_shipped_suites_index():
    assert shipped_suites() == {p.stem: p for p in SUITE_YAMLS}
