"""Property-based fuzzing of plan and suite YAML: any mapping -- and any YAML *text*: random bytes,
anchors and aliases, tags, deep nesting, duplicate keys -- either validates or is refused with
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


# YAML text, not just mappings: what a careless or hostile file holds (qeval.core.yaml_safe)
SCALAR_TEXT = ["1", "-3", "0", "1e30", "1.0e+30", "99999999999999999999", ".inf", "-.inf", ".nan", "~", "true", "''",
               "none", "bnb-nf4", "smoke", "qeval_analogy", "cpu", "'x: y'", "\"\\xff\"", "!!int abc", "!!int 7",
               "!!float x", "!!timestamp 2020-13-45x", "!!timestamp 2020-01-01", "!!binary '@@'", "!!set {1, 2}",
               "!!omap [a]", "!function utils.f", "!!python/object/apply:os.system [ls]", "!custom x", "!!str 5",
               "*a", "*nope", "&a 1", "&a [x, x, x, x]", "[", "{", "]", "- x", "<<: *a", "\t", "%YAML 1.1"]


def _nest(inner: str, depth: int, kind: str) -> str:
    return ("[" * depth + inner + "]" * depth) if kind == "seq" else ("{k: " * depth + inner + "}" * depth)


yaml_value = st.recursive(
    st.sampled_from(SCALAR_TEXT),
    lambda inner: st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
    | st.dictionaries(st.sampled_from(PLAN_KEYS + TASK_KEYS + ["<<", "k"]), inner, max_size=3).map(
        lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}")
    | st.tuples(inner, st.integers(1, 120), st.sampled_from(["seq", "map"])).map(lambda a: _nest(*a))
    | st.tuples(st.sampled_from("abc"), inner).map(lambda a: f"&{a[0]} {a[1]}"),
    max_leaves=10)
bombs = st.sampled_from(["", "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 10)}]\n" for i in range(1, 9)), "r: &r [*r]\n"])
yaml_text = st.tuples(bombs, st.lists(st.tuples(st.sampled_from(PLAN_KEYS + SUITE_KEYS) | st.text(max_size=4), yaml_value),
                                      max_size=6)).map(lambda t: t[0] + "".join(f"{k}: {v}\n" for k, v in t[1]))
yaml_bytes = st.binary(max_size=300) | yaml_text.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.tuples(
    yaml_text, st.binary(min_size=1, max_size=4)).map(lambda t: t[0].encode() + t[1])


def _loads_or_refuses(data: bytes, tmp_path_factory, load) -> None:
    """Write `data` as it is and `load` it: only QevalErrors, one line each (exit 2), ever."""
    path = tmp_path_factory.mktemp("fuzz") / "file.yaml"
    path.write_bytes(data)
    try:
        load(path)
    except QevalError as e:
        for err in getattr(e, "errors", [e]):
            assert "\n" not in str(err) and "expected" in str(err)


@FUZZ
@given(data=yaml_bytes)
def test_plan_yaml_text_validates_or_refuses(data, tmp_path_factory):
    from qeval.run.runner import load_plan, validate

    _loads_or_refuses(data, tmp_path_factory, lambda p: validate(load_plan(p)))


@FUZZ
@given(data=yaml_bytes)
def test_suite_yaml_text_validates_or_refuses(data, tmp_path_factory):
    from qeval.eval.suites import load_suite

    _loads_or_refuses(data, tmp_path_factory, lambda p: load_suite(str(p)))


@FUZZ
@given(data=yaml_bytes)
def test_task_yaml_text_loads_or_refuses(data, tmp_path_factory):
    """Task YAML (read by qeval before lm-eval): the loader alone, and the `!function` scan over it."""
    from qeval.core.yaml_safe import load_yaml
    from qeval.eval.task_code import function_refs

    _loads_or_refuses(data, tmp_path_factory, lambda p: list(function_refs(load_yaml(p, "task"))))
