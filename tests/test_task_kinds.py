"""Every kind of lm-eval task, end to end on the tiny model: lm-eval's own YAML (gsm8k's regex
filters, the mmlu_stem group of 3 subtasks, lambada's perplexity, wikitext's rolling perplexities,
bleu/ter/chrf generation, mrpc's f1, cola's mcc) served from a local data mirror (tests/task_kit.py)
-> run -> store -> report -> nightly -> paired statistics. Stored numbers are checked against a
direct `lm_eval.simple_evaluate` of the same model and tasks, and against independent computations."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from qeval.stats.compare import paired_frame, results_frame
from qeval.data.mirror import set_plan_mirror
from qeval.run.runner import Plan, run_plan
from qeval.store.store import Store
from task_kit import KIT_TASKS, MMLU_SIZES, build_builtin_mirror, build_kit

LIMIT = 20  # the bootstrap kinds' minimum


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return build_kit(tmp_path_factory.mktemp("kit"))


@pytest.fixture(scope="module")
def kit_run(kit, tiny_model_dir, tmp_path_factory):
    """One run of every kit task on two formats (module scope: shared by the checks below)."""
    tasks, mirror = kit
    root = tmp_path_factory.mktemp("kit-run")
    suite = root / "kinds.yaml"
    entries = [{"task": t, "limit": LIMIT, "batch_size": 8} for t in KIT_TASKS]
    entries[KIT_TASKS.index("gsm8k")]["primary_metric"] = "exact_match,flexible-extract"  # the override
    suite.write_text(json.dumps({"name": "kinds", "tasks": entries, "include_path": str(tasks)}))
    plan = Plan(models=(str(tiny_model_dir),), formats=("none", "bnb-nf4"), suite=str(suite), device="cpu",
                data_mirror=str(mirror))
    store_path = root / "store.sqlite"
    old = os.environ.pop("QEVAL_DATA_MIRROR", None)
    try:
        summary = run_plan(plan, store_path, progress=lambda s: None)
    finally:
        set_plan_mirror(None)  # the plan's mirror is process state: leave none behind for other tests
        if old is not None:
            os.environ["QEVAL_DATA_MIRROR"] = old
    with Store(store_path) as store:
        records = list(store.records())
        samples = {r.key: store.samples(r.key) for r in records}
    return summary, records, samples, plan, store_path


def _rec(records, task, quant="none"):
    return next(r for r in records if r.task.name == task and r.variant.quant == quant)


def test_every_kind_runs_and_is_stored(kit_run):
    summary, records, samples, *_ = kit_run
    assert not summary.failed, summary.failed
    assert {r.task.name for r in records} == set(KIT_TASKS)
    gsm = _rec(records, "gsm8k")
    assert set(gsm.metrics) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    assert gsm.primary_metric == "exact_match,flexible-extract"  # the suite's override
    assert gsm.task.extra["primary_metric"] == "exact_match,flexible-extract"  # part of the cell key
    # the default: the first metric of the metric_list (under the first filter)
    assert _rec(records, "lambada_openai").primary_metric == "perplexity"
    assert _rec(records, "mrpc").primary_metric == "acc" and _rec(records, "kit_bleu").primary_metric == "bleu"
    group = _rec(records, "mmlu_stem")
    assert set(group.subtasks) == {f"mmlu_{s}" for s in MMLU_SIZES}
    assert {r.metrics["acc"].aggregation for r in group.subtasks.values()} == {"mean"}
    assert _rec(records, "lambada_openai").metrics["perplexity"].aggregation == "perplexity"
    assert _rec(records, "wikitext").metrics["word_perplexity"].aggregation == "weighted_perplexity"
    assert _rec(records, "kit_bleu").metrics["bleu"].aggregation == "bleu"
    assert _rec(records, "mrpc").metrics["f1"].aggregation == "f1"
    assert _rec(records, "cola").metrics["mcc"].aggregation == "matthews_corrcoef"


def test_group_aggregate_is_size_weighted(kit_run):
    """lm-eval's mmlu_stem weights subtasks by size: the group's acc is the pooled mean."""
    _, records, samples, *_ = kit_run
    group = _rec(records, "mmlu_stem")
    ss = samples[group.key]
    sizes = {s: min(LIMIT, n) for s, n in MMLU_SIZES.items()}
    for sub, n in sizes.items():
        mine = [s for s in ss if s["task"] == f"mmlu_{sub}"]
        assert len(mine) == n == group.subtasks[f"mmlu_{sub}"].n
        assert group.subtasks[f"mmlu_{sub}"].metrics["acc"].value == pytest.approx(np.mean([s["acc"] for s in mine]))
    assert group.metrics["acc"].value == pytest.approx(np.mean([s["acc"] for s in ss]))


def test_per_filter_values_match_the_regexes(kit_run):
    """gsm8k's strict-match takes the number after '#### ' in the generation (lm-eval's regex filter);
    recomputed here from the stored responses, independently of lm-eval's metric code."""
    _, records, samples, *_ = kit_run
    ss = samples[_rec(records, "gsm8k").key]
    assert len(ss) == LIMIT and all("exact_match,strict-match" in s and "exact_match,flexible-extract" in s for s in ss)
    value = _rec(records, "gsm8k").metrics["exact_match,strict-match"].value
    assert value == pytest.approx(np.mean([s["exact_match,strict-match"] for s in ss]))


def test_corpus_and_perplexity_values_from_samples(kit_run):
    """Corpus metrics re-aggregated from the stored per-document items with independent code
    (sacrebleu, sklearn) equal the stored values; LAMBADA perplexity is exp(-mean loglikelihood)."""
    import sacrebleu
    from sklearn.metrics import f1_score, matthews_corrcoef

    _, records, samples, *_ = kit_run
    lam = _rec(records, "lambada_openai")
    lls = [s["perplexity"] for s in samples[lam.key]]
    assert lam.metrics["perplexity"].value == pytest.approx(math.exp(-np.mean(lls)))
    bleu = _rec(records, "kit_bleu")
    items = [s["bleu"] for s in samples[bleu.key]]
    refs, preds = [i[0] for i in items], [i[1] for i in items]
    expected = sacrebleu.corpus_bleu(preds, [[r if isinstance(r, str) else r[0] for r in refs]]).score
    assert bleu.metrics["bleu"].value == pytest.approx(expected)
    mrpc, cola = _rec(records, "mrpc"), _rec(records, "cola")
    f1 = [s["f1"] for s in samples[mrpc.key]]
    assert mrpc.metrics["f1"].value == pytest.approx(f1_score([g for g, _ in f1], [p for _, p in f1]))
    mcc = [s["mcc"] for s in samples[cola.key]]
    assert cola.metrics["mcc"].value == pytest.approx(matthews_corrcoef([g for g, _ in mcc], [p for _, p in mcc]))


@pytest.mark.slow  # a second evaluation of four tasks through lm-eval alone
def test_stored_values_equal_a_direct_simple_evaluate(kit, kit_run, tiny_model_dir):
    """The same model and tasks through lm-eval directly (its own HFLM, no qeval in the path but
    the mirror): every stored (task or subtask, filter, metric) value is lm-eval's."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qeval.data.mirror import serving

    tasks, mirror = kit
    _, records, *_ = kit_run
    lm = HFLM(pretrained=str(tiny_model_dir), batch_size=8, device="cpu")
    names = ["mmlu_stem", "gsm8k", "lambada_openai", "cola"]
    with serving(mirror):
        res = simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_defaults=False, include_path=str(tasks)),
                              limit=LIMIT, num_fewshot=0, random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
                              fewshot_random_seed=1234, bootstrap_iters=0)  # values only: no stderr bootstrap
    for name in names:
        rec = _rec(records, name)
        views = [(name, rec.metrics)] + [(s, v.metrics) for s, v in rec.subtasks.items()]
        for task, metrics in views:
            for mid, m in metrics.items():
                key = mid if "," in mid else f"{mid},none"
                assert m.value == pytest.approx(res["results"][task][key], rel=1e-4, abs=1e-6), (task, mid)


def test_report_nightly_and_paired_statistics(kit, kit_run, tmp_path):
    from qeval.cli import main

    tasks, mirror = kit
    _, records, samples, plan, store_path = kit_run
    frame = results_frame(records)
    assert {"mmlu_stem/mmlu_anatomy", "mmlu_stem"} <= set(frame.task)
    gsm_rows = frame[(frame.task == "gsm8k") & (frame.quant == "bnb-nf4")]
    assert set(gsm_rows.metric) == {"exact_match,strict-match", "exact_match,flexible-extract"}
    pairs = paired_frame(records, samples.get)
    kinds = dict(zip(pairs.task, pairs.kind))
    assert kinds["mmlu_stem"] == kinds["mmlu_stem/mmlu_astronomy"] == "right_wrong"
    assert kinds["lambada_openai"] == "loglikelihood_ratio"  # primary: perplexity, one log-likelihood a document
    assert kinds["kit_bleu"] == "corpus_points" and kinds["mrpc"] == "right_wrong"  # mrpc's primary: acc
    assert kinds["cola"] == "corpus" and kinds["wikitext"] == "loglikelihood_ratio"
    # the group's paired test pools the subtasks' documents (size-weighted, like its aggregate)
    g = pairs[pairs.task == "mmlu_stem"].iloc[0]
    assert g.pairs == sum(min(LIMIT, n) for n in MMLU_SIZES.values())
    assert pairs.p_value.notna().all() and pairs.delta_lo.notna().all()
    out = tmp_path / "report"
    assert main(["report", "--store", str(store_path), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "mmlu_stem/mmlu_anatomy" in md and "exact_match,flexible-extract" in md and "kit_bleu" in md
    # two nightly runs on the same store: every cell reused, every metric compared (no crash, exit 0)
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(json.dumps({"models": list(plan.models), "formats": list(plan.formats), "suite": plan.suite,
                                     "device": "cpu", "data_mirror": str(mirror)}))
    try:
        for _ in range(2):
            assert main(["nightly", str(plan_file), "--store", str(store_path)]) == 0
    finally:
        set_plan_mirror(None)


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_chat_template_is_applied_and_keyed(kit, tiny_model_dir, tmp_path):
    """apply_chat_template / system_instruction reach lm-eval (LAMBADA's perplexity under the
    template equals lm-eval's own with the same settings, and differs from the plain prompt) and
    are part of the cell key."""
    import shutil

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from qeval.data.mirror import serving

    tasks, mirror = kit
    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    suite = tmp_path / "chat.yaml"
    suite.write_text(json.dumps({"name": "chat", "include_path": str(tasks), "apply_chat_template": True,
                                 "system_instruction": "Complete the sentence.",
                                 "tasks": [{"task": "lambada_openai", "limit": 10, "batch_size": 4}]}))
    plain = tmp_path / "plain.yaml"
    plain.write_text(json.dumps({"name": "plain", "include_path": str(tasks),
                                 "tasks": [{"task": "lambada_openai", "limit": 10, "batch_size": 4}]}))
    store = tmp_path / "s.sqlite"
    for s in (suite, plain):
        plan = Plan(models=(str(model),), formats=("none",), suite=str(s), device="cpu", data_mirror=str(mirror))
        assert not run_plan(plan, store, progress=lambda x: None).failed
    set_plan_mirror(None)
    with Store(store) as st:
        recs = list(st.records())
    chat = next(r for r in recs if r.task.extra.get("apply_chat_template"))
    other = next(r for r in recs if not r.task.extra.get("apply_chat_template"))
    assert chat.key != other.key and chat.task.extra["system_instruction"] == "Complete the sentence."
    lm = HFLM(pretrained=str(model), batch_size=4, device="cpu")
    with serving(mirror):
        res = simple_evaluate(model=lm, tasks=["lambada_openai"], limit=10, num_fewshot=0, apply_chat_template=True,
                              system_instruction="Complete the sentence.", fewshot_as_multiturn=False, bootstrap_iters=0,
                              task_manager=TaskManager(include_defaults=False, include_path=str(tasks)))
    ppl = chat.metrics["perplexity"].value
    assert ppl == pytest.approx(res["results"]["lambada_openai"]["perplexity,none"], rel=1e-4)
    assert ppl != pytest.approx(other.metrics["perplexity"].value, rel=1e-3)


def test_mirror_fingerprint_follows_the_files(kit, tmp_path, monkeypatch):
    """The mirrored files' content is the task's data fingerprint: a changed row, a new key."""
    import shutil

    from qeval.eval.suites import task_fingerprint

    tasks, mirror = kit
    copy = tmp_path / "mirror"
    shutil.copytree(mirror, copy)
    monkeypatch.setenv("QEVAL_DATA_MIRROR", str(copy))
    before = task_fingerprint("mmlu_stem", (tasks,))
    assert task_fingerprint("gsm8k", (tasks,)) != before
    f = copy / "cais__mmlu" / "anatomy" / "test.jsonl"
    f.write_text(f.read_text().replace("is to", "is like", 1))
    assert task_fingerprint("mmlu_stem", (tasks,)) != before


@pytest.mark.slow  # indexes lm-eval's ~12,000 built-in task names and runs mmlu's 57 subjects
def test_builtin_benchmarks_offline_from_a_mirror(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The issue's command: `qeval run --tasks gsm8k,mmlu,lambada_openai --formats none,bnb-nf4`
    offline, lm-eval's built-in YAML served from a mirror -> a report with subtask tables,
    per-filter rows and paired intervals."""
    from qeval.cli import main

    mirror = build_builtin_mirror(tmp_path / "m")
    monkeypatch.setenv("QEVAL_DATA_MIRROR", str(mirror))
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "s.sqlite"
    assert main(["run", "--tasks", "gsm8k,mmlu,lambada_openai", "--model", str(tiny_model_dir), "--limit", "10",
                 "--formats", "none,bnb-nf4", "--batch-size", "8", "--store", str(store)]) == 0
    with Store(store) as st:
        records = list(st.records())
    mmlu = next(r for r in records if r.task.name == "mmlu")
    assert len([s for s, v in mmlu.subtasks.items() if not v.group]) == 57
    assert {"mmlu_stem", "mmlu_humanities"} <= set(mmlu.subtasks)
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "mmlu/mmlu_anatomy" in md and "exact_match,strict-match" in md and "exact_match,flexible-extract" in md
    pairs = (tmp_path / "r" / "results.csv").read_text()
    assert "delta_lo" in pairs.splitlines()[0]
    # a dataset missing from the mirror: one line naming the folder it expected
    (mirror / "EleutherAI__lambada_openai" / "default" / "test.jsonl").unlink()
    capsys.readouterr()
    assert main(["run", "--tasks", "lambada_openai", "--model", str(tiny_model_dir), "--formats", "none",
                 "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "EleutherAI__lambada_openai/default" in err[0]
