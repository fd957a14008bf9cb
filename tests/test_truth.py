"""Truth checks: qeval's numbers equal lm-eval's own, flips recomputed from stored samples match,
and two CPU runs of the same cell are bit-identical."""
import dataclasses

import pytest

from qeval.stats.paired import compare_pair
from qeval.run.runner import Plan, run_plan
from qeval.store.store import Store
from qeval.eval.suites import TASKS_DIR

SUITE = """name: truth
tasks:
  - {task: qeval_analogy, limit: 12, batch_size: 4}
  - {task: qeval_similarity, limit: 12, batch_size: 4}
  - {task: qeval_lee_ppl, limit: 2, divergence: true}
"""


@pytest.fixture(scope="module")
def stores(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("truth")
    (tmp / "s.yaml").write_text(SUITE)
    plan = Plan(models=(str(tiny_model_dir),), formats=("none", "bnb-nf4"), suite=str(tmp / "s.yaml"), device="cpu")
    out = []
    for name in ("a", "b"):
        run_plan(plan, tmp / f"{name}.sqlite", progress=lambda s: None)
        out.append(tmp / f"{name}.sqlite")
    return out


def _records(path):
    with Store(path) as s:
        return {(r.variant.quant, r.task.name): (r, s.samples(r.key)) for r in s.records()}


def test_accuracy_equals_a_direct_lm_eval_run(stores, tiny_model_dir):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    recs = _records(stores[0])
    lm = HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4)
    tm = TaskManager(include_defaults=False, include_path=str(TASKS_DIR))
    for task in ("qeval_analogy", "qeval_similarity"):
        direct = simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=12, num_fewshot=0,
                                 log_samples=True, bootstrap_iters=0)
        rec, samples = recs[("none", task)]
        assert rec.metrics["acc"].value == direct["results"][task]["acc,none"]
        assert [s["acc"] for s in samples] == [s["acc"] for s in direct["samples"][task]]


def test_flips_recomputed_from_stored_samples(stores):
    recs = _records(stores[0])
    base, var = recs[("none", "qeval_analogy")][1], recs[("bnb-nf4", "qeval_analogy")][1]
    by_id = {s["doc_id"]: s["acc"] for s in base}
    rw = sum(1 for s in var if by_id[s["doc_id"]] == 1 and s["acc"] == 0)
    wr = sum(1 for s in var if by_id[s["doc_id"]] == 0 and s["acc"] == 1)
    stats = compare_pair(base, var, "acc", True)
    assert (stats.right_to_wrong, stats.wrong_to_right) == (rw, wr)
    # and the aggregate is the mean of the stored per-sample values
    assert recs[("bnb-nf4", "qeval_analogy")][0].metrics["acc"].value == pytest.approx(
        sum(s["acc"] for s in var) / len(var))


def test_two_cpu_runs_are_bit_identical(stores):
    a, b = _records(stores[0]), _records(stores[1])
    assert a.keys() == b.keys()
    for k in a:
        (ra, sa), (rb, sb) = a[k], b[k]
        assert ra.key == rb.key
        assert ra.metrics == rb.metrics  # exact float equality, stderr included
        assert sa == sb
        if ra.divergence and ra.divergence.measured:
            da = dataclasses.replace(ra.divergence, seconds=None)
            db = dataclasses.replace(rb.divergence, seconds=None)
            assert da == db
