"""Property-based fuzzing of plan and suite YAML: any mapping either validates or is refused with
QevalErrors (exit 2, one line each) -- never another exception, never a traceback."""
from __future__ import annotations

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qeval.core.errors import QevalError

PLAN_KEYS = ["models", "formats", "suite", "device", "seed", "bootstrap_iters", "adapters", "arms", "thresholds",
             "include_path"]
SUITE_KEYS = ["name", "description", "tasks", "include_path"]
TASK_KEYS = ["task", "limit", "num_fewshot", "batch_size", "divergence"]
NAMES = ["none", "bnb-nf4", "bnb-nf44", "smoke", "default", "qeval_analogy", "qeval_lee_ppl", "cpu", "cuda", "auto",
         "lora", "qlora", "dequantized", "x", ""]

scalars = (st.none() | st.booleans() | st.integers(-3, 2000) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(NAMES) | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(NAMES + TASK_KEYS + ["quant", "adapter", "merge", "lr"]) | st.text(max_size=5),
                                        inner, max_size=3), max_leaves=8)
task_entries = st.dictionaries(st.sampled_from(TASK_KEYS) | st.text(max_size=5), values, max_size=5) | values


def mapping(keys, extra=None):
    fields = {k: values for k in keys}
    if extra:
        fields.update(extra)
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), values, max_size=len(keys)).flatmap(
        lambda d: st.fixed_dictionaries({}, optional=fields).map(lambda o: {**d, **o}))


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


def _validates_or_refuses(data, tmp_path_factory, load) -> None:
    """Write `data` as YAML and `load` it: it validates, or every error is one line (never a traceback)."""
    path = tmp_path_factory.mktemp("fuzz") / "file.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        load(path)
    except QevalError as e:
        for err in getattr(e, "errors", [e]):
            assert "\n" not in str(err)
            assert "expected" in str(err)


@FUZZ
@given(data=mapping(PLAN_KEYS))
def test_plan_yaml_validates_or_refuses(data, tmp_path_factory):
    from qeval.run.runner import load_plan, validate

    _validates_or_refuses(data, tmp_path_factory, lambda p: validate(load_plan(p)))


@FUZZ
@given(data=mapping(SUITE_KEYS, {"tasks": st.lists(task_entries, max_size=3) | values}))
def test_suite_yaml_validates_or_refuses(data, tmp_path_factory):
    from qeval.eval.suites import load_suite

    _validates_or_refuses(data, tmp_path_factory, lambda p: load_suite(str(p)))
