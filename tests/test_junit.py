"""`qeval nightly --junit/--summary-md`: the JUnit file is valid against the JUnit schema CI systems
read, carries one testcase per gate (counted here from the store, independently of the gates'
code), a failure carrying each regression's finding line, skips for gates that could not be
evaluated, and both files are written even when the nightly exits 1."""
from pathlib import Path

import pytest
from lxml import etree

from qeval.cli import main
from qeval.core import env
from qeval.gates.nightly import EXIT_OK, EXIT_REGRESSION
from qeval.run import jobs
from qeval.store.store import Store

XSD = Path(__file__).parent / "data" / "junit-10.xsd"
PLAN = """models: [{model}]
formats: [none, bnb-nf4]
suite: {suite}
device: cpu
thresholds:
  min_recovery: 0.0
  per_metric: {{word_perplexity: 0.1}}
"""
SUITE = """name: junit
tasks:
  - {task: qeval_analogy, limit: 40, batch_size: 8}
  - {task: qeval_lee_ppl, limit: 2}
"""


@pytest.fixture
def plan_path(tiny_model_dir, tmp_path):
    (tmp_path / "suite.yaml").write_text(SUITE)
    p = tmp_path / "plan.yaml"
    p.write_text(PLAN.format(model=tiny_model_dir, suite=tmp_path / "suite.yaml"))
    return p


def parse(path: Path) -> etree._Element:
    doc = etree.parse(str(path))
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    assert schema.validate(doc), schema.error_log
    return doc.getroot()


def expected_gates(store: Path, run_id: int) -> tuple[int, int]:
    """(change gates, threshold gates) of a run, counted from its records: every cell and metric is
    compared with the previous run; the plan's thresholds gate each non-baseline cell's primary
    metric (min_recovery) and word_perplexity wherever it is (per_metric)."""
    with Store(store, readonly=True) as s:
        run = next(r for r in s.runs() if r["run_id"] == run_id)
        recs = [s.get(k) for k in run["cells"]]
    change = sum(len(r.metrics) for r in recs)
    threshold = sum(len({r.primary_metric} | ({"word_perplexity"} & set(r.metrics)))
                    for r in recs if not r.variant.is_baseline)
    return change, threshold


def cases(root) -> dict[tuple[str, str], etree._Element]:
    out = {}
    for c in root.iter("testcase"):
        key = (c.get("classname"), c.get("name"))
        assert key not in out, key  # one testcase per gate
        out[key] = c
    return out


def test_junit_and_summary_one_testcase_per_gate(plan_path, tmp_path, monkeypatch, capsys):
    store, junit, md = tmp_path / "store.sqlite", tmp_path / "ci" / "junit.xml", tmp_path / "ci" / "summary.md"
    args = ["nightly", str(plan_path), "--store", str(store), "--junit", str(junit), "--summary-md", str(md)]
    assert main(args) == EXIT_OK
    root = parse(junit)
    change, threshold = expected_gates(store, 1)
    assert change > 4 and threshold == 2  # nf4: analogy acc (min_recovery), lee word_perplexity (both gates)
    by = cases(root)
    changes = [c for (_, name), c in by.items() if name.endswith(": change")]
    assert len(changes) == change and len(by) == change + threshold
    # the first night has nothing to compare with: every change gate is skipped, with the reason
    assert all(c.find("skipped") is not None and "no earlier result" in c.find("skipped").get("message")
               for c in changes)
    assert root.get("failures") == "0" and int(root.get("tests")) == len(by)
    capsys.readouterr()

    # night 2: a pretend bitsandbytes release breaks NF4 analogies
    versions = {**env.versions(), "bitsandbytes": "9.9.9"}
    monkeypatch.setattr(env, "versions", lambda: versions)
    real = jobs.evaluate

    def broken_release(loaded, task, spec, *rest):
        out = real(loaded, task, spec, *rest)
        if loaded.fmt.name == "bnb-nf4" and task.task == "qeval_analogy":
            for s in out.samples:
                s["acc"] = 0.0
            out.metrics["acc"].value = 0.0
        return out

    monkeypatch.setattr(jobs, "evaluate", broken_release)
    assert main(args) == EXIT_REGRESSION  # the files are still written
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("REGRESSION")]
    root = parse(junit)
    by = cases(root)
    assert len(by) == sum(expected_gates(store, 2))
    failed = [(k, c) for k, c in by.items() if c.find("failure") is not None]
    assert [k for k, _ in failed] == [(printed[0].split(": ")[1].split(" acc")[0], "acc: change")]
    assert failed[0][1].find("failure").get("message") == printed[0]  # the finding line, as printed
    assert root.get("failures") == "1"
    # the recomputed cells were compared (new keys): nothing skipped now
    assert not [c for c in by.values() if c.find("skipped") is not None]
    text = md.read_text()
    assert "run 2: 1 regression (exit 1)" in text and "### Regressions (1)" in text
    assert "bnb-nf4 / qeval_analogy" in text and "### What this nightly can detect" in text
    assert "| qeval_analogy | acc | 40 |" in text  # n of the analogy task, as the plan limits it

    # acknowledged: the gate passes with the finding as output, and the summary lists it
    assert main(["nightly", str(plan_path), "--store", str(store), "--ack", "bnb-nf4 / qeval_analogy",
                 "--reason", "known"]) == 0
    assert main(args) == EXIT_OK
    by = cases(parse(junit))
    (ack,) = [c for (cell, name), c in by.items() if name == "acc: change" and "bnb-nf4" in cell]
    assert ack.find("failure") is None and "ACKNOWLEDGED" in ack.find("system-out").text
    assert "### Acknowledged (1)" in md.read_text() and "### Regressions: none" in md.read_text()


def test_bad_output_path_is_bad_input_before_anything_runs(plan_path, tmp_path, capsys):
    store = tmp_path / "store.sqlite"
    code = main(["nightly", str(plan_path), "--store", str(store), "--junit", str(tmp_path)])
    assert code == 2 and "--junit" in capsys.readouterr().err
    assert not store.exists()


def test_could_not_finish_still_writes_an_error_report(plan_path, tmp_path, monkeypatch):
    import qeval.gates.nightly as nightly_mod

    def bug(*a, **k):
        raise RuntimeError("a bug, not a regression")

    monkeypatch.setattr(nightly_mod, "run_plan", bug)
    junit, md = tmp_path / "junit.xml", tmp_path / "summary.md"
    code = main(["nightly", str(plan_path), "--store", str(tmp_path / "s.sqlite"), "--junit", str(junit),
                 "--summary-md", str(md)])
    assert code == 3
    root = parse(junit)
    (err,) = root.iter("error")
    assert "a bug" in err.get("message") and root.get("errors") == "1"
    assert "could not finish" in md.read_text()
