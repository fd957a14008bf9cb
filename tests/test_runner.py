"""The orchestration: every format end to end on the tiny model, rerun computes nothing, crash safety."""
import pytest

from qeval.run import jobs, runner
from qeval.run.runner import Plan, plan_from, run_plan
from qeval.store.store import Store
from qeval.quant.formats import DEFAULT_FORMATS

SUITE = """name: tiny
tasks:
  - {task: qeval_analogy, limit: 8, batch_size: 8}
  - {task: qeval_lee_ppl, limit: 2}
"""


@pytest.fixture
def plan(tiny_model_dir, tmp_path):
    (tmp_path / "tiny.yaml").write_text(SUITE)
    return Plan(models=(str(tiny_model_dir),), suite=str(tmp_path / "tiny.yaml"), device="cpu")


def test_all_formats_then_rerun_computes_nothing(plan, tmp_path):
    store_path = tmp_path / "store.sqlite"
    first = run_plan(plan, store_path, progress=lambda s: None)
    assert len(first.computed) == 2 * len(DEFAULT_FORMATS) and not first.failed and not first.reused

    with Store(store_path) as store:
        records = list(store.records())
        assert len(records) == 12
        for r in records:  # every record carries its spec and provenance
            assert r.variant.quant in DEFAULT_FORMATS
            assert r.model.fingerprint and r.task.fingerprint
            assert {"torch", "transformers", "bitsandbytes", "lm_eval"} <= set(r.versions)
            assert r.git_sha and r.device == "cpu" and r.seed == 1234
            assert r.timings.eval_s > 0 and r.peak_bytes > 0 and r.footprint.total_bytes > 0
            assert r.n == (8 if r.task.name == "qeval_analogy" else 2)
            samples = store.samples(r.key)
            assert len(samples) == r.n and {"doc_id", "doc_hash"} <= set(samples[0])
        acc = {r.variant.quant: r.metrics["acc"] for r in records if r.task.name == "qeval_analogy"}
        # per-sample outputs agree with the aggregate lm-eval reported
        for r in records:
            if r.task.name == "qeval_analogy":
                s = store.samples(r.key)
                assert sum(x["acc"] for x in s) / len(s) == pytest.approx(r.metrics["acc"].value)
        assert all(0 <= a.value <= 1 for a in acc.values())

    loads = []
    real_load = jobs.load_model
    jobs.load_model = lambda *a, **k: loads.append(a) or real_load(*a, **k)
    try:
        second = run_plan(plan, store_path, progress=lambda s: None)
    finally:
        jobs.load_model = real_load
    assert second.computed == [] and len(second.reused) == 12
    assert loads == []  # nothing loaded either


def test_crash_mid_run_loses_only_the_cell_in_flight(plan, tmp_path, monkeypatch):
    store_path = tmp_path / "store.sqlite"
    small = Plan(**{**plan.__dict__, "formats": ("none", "bnb-nf4")})
    calls = []
    real_eval = jobs.evaluate

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user hits ^C during the third cell
        return real_eval(*a, **k)

    monkeypatch.setattr(jobs, "evaluate", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_plan(small, store_path, progress=lambda s: None)
    with Store(store_path) as store:
        assert len(store) == 2
    monkeypatch.setattr(jobs, "evaluate", real_eval)
    resumed = run_plan(small, store_path, progress=lambda s: None)
    assert len(resumed.computed) == 2 and len(resumed.reused) == 2


def test_failed_cell_is_reported_and_run_continues(plan, tmp_path, monkeypatch):
    real_eval = jobs.evaluate

    def flaky(loaded, task, spec, *rest):
        if task.task == "qeval_lee_ppl":
            raise RuntimeError("out of memory (simulated)")
        return real_eval(loaded, task, spec, *rest)

    monkeypatch.setattr(jobs, "evaluate", flaky)
    summary = run_plan(Plan(**{**plan.__dict__, "formats": ("none",)}), tmp_path / "s.sqlite", progress=lambda s: None)
    assert len(summary.computed) == 1
    assert len(summary.failed) == 1 and "out of memory" in summary.failed[0] and "qeval_lee_ppl" in summary.failed[0]


def test_key_changes_with_what_determines_the_numbers(plan, tiny_model_dir):
    from qeval.eval.evaluate import EvalSpec
    from qeval.models.load import resolve_model
    from qeval.eval.suites import load_suite

    model = resolve_model(str(tiny_model_dir))
    suite = load_suite(plan.suite)
    key = lambda fmt="bnb-nf4", spec=EvalSpec(), dev="cpu": runner.make_cells(model, runner.Arm(fmt, fmt), suite, spec, dev)[0].key
    base = key()
    assert key() == base  # deterministic
    assert key("bnb-nf4-dq") != base
    assert key(spec=EvalSpec(seed=7)) != base
    assert key(dev="cuda") != base  # bf16 compute on CUDA measures something else
    cells = runner.make_cells(model, runner.Arm("nf4", "bnb-nf4"), suite, EvalSpec(), "cpu")
    assert len({c.key for c in cells}) == 2 and len({c.variant_id for c in cells}) == 1


ADAPTERS = {"lora": {"train_quant": "none", "steps": 2, "batch_size": 2, "seq_len": 32, "eval_every": 1,
                     "domain_tasks": ["qeval_lee_ppl"]},
            "qlora": {"train_quant": "bnb-nf4-dq", "steps": 2, "batch_size": 2, "seq_len": 32, "eval_every": 1,
                      "domain_tasks": ["qeval_lee_ppl"]}}
ARMS = ({"name": "lora", "quant": "none", "adapter": "lora"},
        {"name": "qlora", "quant": "bnb-nf4-dq", "adapter": "qlora"},
        {"name": "nf4+lora", "quant": "bnb-nf4-dq", "adapter": "lora"},
        {"name": "qlora-merged-float", "quant": "bnb-nf4-dq", "adapter": "qlora", "merge": "dequantized"},
        {"name": "qlora-merged-nf4", "quant": "bnb-nf4-dq", "adapter": "qlora", "merge": "requantized"})


def test_adapter_arms_train_once_and_report(plan, tmp_path, monkeypatch):
    from qeval.stats.compare import adapter_frames, decision, results_frame

    from qeval.train.recipe import finetune as real_finetune

    monkeypatch.setattr(jobs, "finetune", lambda *a, **k: real_finetune(*a, **{**k, "isolate": False}))
    arm_plan = plan_from({**plan.__dict__, "formats": ("none", "bnb-nf4-dq"), "adapters": ADAPTERS, "arms": ARMS})
    store_path = tmp_path / "store.sqlite"
    first = run_plan(arm_plan, store_path, progress=lambda s: None)
    assert len(first.computed) == 2 * 7 and len(first.trained) == 2 and not first.failed
    import qeval.run.preflight as preflight

    checked = []  # the training data is checked (tokenized) only for adapters not trained yet
    monkeypatch.setattr(preflight, "_data_problems", lambda model, adapters, *a: checked.append(sorted(adapters)) or [])
    second = run_plan(arm_plan, store_path, progress=lambda s: None)
    assert second.computed == [] and second.trained == []  # nothing retrained, nothing re-evaluated
    assert checked == []
    changed = plan_from({**arm_plan.__dict__, "adapters": {**ADAPTERS, "lora": {**ADAPTERS["lora"], "steps": 3}}})
    rp = runner.validate(changed)
    preflight.preflight(list({id(m): m for m, _, _ in runner.expand(changed, rp)}.values()), rp)
    assert checked == [["lora"]]  # a changed recipe is a new adapter: its data is checked again

    with Store(store_path) as store:
        records = list(store.records())
    res = results_frame(records)
    assert set(res.arm) == {"none", "bnb-nf4-dq", "lora", "qlora", "nf4+lora", "qlora-merged-float", "qlora-merged-nf4"}
    labels = set(zip(res.quant, res.adapter))
    assert ("bnb-nf4-dq", "qlora@merged-float") in labels and ("bnb-nf4-dq", "qlora@merged-requant") in labels
    frames = adapter_frames(records)
    reg = frames["regained"]
    assert set(reg.arm) == {"lora", "qlora", "nf4+lora", "qlora-merged-float", "qlora-merged-nf4"}
    assert set(reg[reg.arm == "qlora"].reference_arm) == {"bnb-nf4-dq"}
    assert reg[reg.task == "qeval_analogy"].untouched.all() and not reg[reg.task == "qeval_lee_ppl"].untouched.any()
    merges = frames["merge"].set_index(["arm", "task"])
    ppl = merges.xs("qeval_lee_ppl", level="task")
    # merging into the dequantized base reproduces the unmerged adapter (float rounding only)
    assert ppl.loc["qlora-merged-float", "merge_delta"] == pytest.approx(0, abs=1e-3 * ppl.loc["qlora-merged-float", "unmerged_value"])
    train = frames["training"].set_index("adapter")
    assert set(train.index) == {"lora", "qlora"} and train.loc["qlora", "train_quant"] == "bnb-nf4-dq"
    table, verdict = decision(frames, memory_budget=64 * 2**30)
    assert set(table.arm) == {"lora", "qlora"} and "pick" in verdict
    _, none_fits = decision(frames, memory_budget=1)
    assert "Nothing fits" in none_fits


def test_arm_validation_reports_everything(plan):
    """Two passes, each reporting all its problems at once: the schema (unknown keys, types, at any
    depth) when the plan is read, then the meaning (names, merges, clashes) in validate."""
    from qeval.core.errors import QevalErrors

    arms = ({"name": "a", "quant": "bnb-nf4", "adapter": "nope"},
            {"name": "b", "quant": "bnb-int8", "adapter": "q", "merge": "requantized"},
            {"name": "none", "quant": "none"})
    raw = {**plan.__dict__, "adapters": {"q": {"train_quant": "bnb-nf5", "method": "full", "stepz": 1}},
           "arms": arms + ({"name": "c", "quant": "bnb-nf4", "colour": "red"}, {"name": "d", "merge": 3})}
    with pytest.raises(QevalErrors) as ei:
        plan_from(raw)
    text = str(ei.value)
    assert "unknown key in adapters.q 'stepz'" in text and "did you mean 'steps'" in text
    assert "unknown key in arms[3] 'colour'" in text and "arms[4].merge 3" in text

    bad = plan_from({**raw, "adapters": {"q": {"train_quant": "bnb-nf5", "method": "full"}}, "arms": arms})
    with pytest.raises(QevalErrors) as ei:
        runner.validate(bad)
    text = str(ei.value)
    assert "did you mean 'bnb-nf4'" in text  # train_quant typo
    assert "'nope'" in text and "adapters" in text  # unknown adapter name
    assert "merge" in text and "4-bit" in text  # merge path on int8 / full fine-tune
    assert "arm name 'none'" in text  # clashes with the format arm


def test_compute_dtype_is_an_explicit_checked_choice(plan, tiny_model_dir, monkeypatch):
    import torch

    from qeval.core import env
    from qeval.core.errors import QevalError, QevalErrors
    from qeval.eval.evaluate import EvalSpec
    from qeval.models.load import resolve_model
    from qeval.eval.suites import load_suite

    with pytest.raises(QevalError, match="did you mean 'bf16'"):
        runner.validate(Plan(**{**plan.__dict__, "compute_dtype": "bf61"}))
    monkeypatch.setattr(env, "cpu_bf16_isa", lambda: None)  # an AVX2-only CPU
    with pytest.raises(QevalError, match="AVX512-BF16 or AMX"):
        runner.validate(Plan(**{**plan.__dict__, "compute_dtype": "bf16"}))
    monkeypatch.setattr(env, "cpu_bf16_isa", lambda: "avx512_bf16")
    assert runner.validate(Plan(**{**plan.__dict__, "compute_dtype": "bf16"})).dtype == torch.bfloat16
    with pytest.raises((QevalError, QevalErrors), match="adapter training on CPU"):
        runner.validate(plan_from({**plan.__dict__, "compute_dtype": "bf16", "adapters": {"l": {}}}))

    model, suite = resolve_model(str(tiny_model_dir)), load_suite(plan.suite)
    key = lambda dtype=None: runner.make_cells(model, runner.Arm("none", "none"), suite, EvalSpec(), "cpu", None,
                                               dtype)[0].key
    assert key() == key(torch.float32)  # explicit float32 on CPU is "auto": stores stay valid
    assert key(torch.bfloat16) != key()
    monkeypatch.setattr(env, "cpu_bf16_isa", lambda: "amx_bf16")
    bf16_amx = key(torch.bfloat16)
    monkeypatch.setattr(env, "cpu_bf16_isa", lambda: "avx512_bf16")
    assert key(torch.bfloat16) != bf16_amx  # which bf16 kernels ran is part of the key


def test_bf16_plan_runs_with_its_own_bf16_baseline(plan, tmp_path, monkeypatch):
    from qeval.core import env

    real = env.cpu_bf16_isa()  # where the CPU lacks bf16 the test runs it emulated: numbers, not speed
    monkeypatch.setattr(env, "cpu_bf16_isa", lambda: real or "avx512_bf16")
    (tmp_path / "div.yaml").write_text("name: d\ntasks:\n  - {task: qeval_lee_ppl, limit: 2, divergence: true}\n")
    bf16 = Plan(**{**plan.__dict__, "suite": str(tmp_path / "div.yaml"), "formats": ("none", "bnb-nf4"),
                   "compute_dtype": "bf16"})
    s = run_plan(bf16, tmp_path / "s.sqlite", progress=lambda m: None)
    assert not s.failed and len(s.computed) == 2
    with Store(tmp_path / "s.sqlite") as st:
        recs = {r.variant.quant: r for r in st.records()}
    assert {r.compute_dtype for r in recs.values()} == {"bfloat16"}
    assert recs["none"].format["compute_dtype"] == "torch.bfloat16"
    assert recs["bnb-nf4"].divergence.kl_mean > 0  # against the bf16 baseline's reference


def test_an_adapter_with_seeds_counts_as_trained_only_when_every_seed_is(monkeypatch):
    """Preflight skips the training-data check only when every seed's artifact is stored."""
    import qeval.train.spec as spec_mod
    from qeval.core import env
    from qeval.run.preflight import untrained
    from qeval.train.spec import AdapterSpec

    monkeypatch.setattr(spec_mod, "adapter_key", lambda model, s, device: f"key-seed-{s.seed}")
    spec = AdapterSpec(seeds=(1, 2))

    def store(seed):
        folder = env.adapter_dir(f"key-seed-{seed}")
        folder.mkdir(parents=True)
        (folder / "qeval-artifact.json").write_text("{}")

    assert untrained(None, spec, "cpu")
    store(1)
    assert untrained(None, spec, "cpu")  # seed 2 still to train: its data is checked
    store(2)
    assert not untrained(None, spec, "cpu")
