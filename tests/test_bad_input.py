"""Every bad input is caught before the store: exit 2, one line per problem naming the value, what
was expected and the fix, no traceback, and the store byte-identical (or still absent).

Each case builds its input in a fresh folder and runs `qeval.cli.main` in-process on the tiny model.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from qeval.cli import main
from qeval.store.store import Store

MC_TASK = """task: my_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{q}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""
MC_ROWS = [{"q": "The capital of France is", "choices": [" Paris", " Rome"], "gold": 0},
           {"q": "Two plus two is", "choices": [" four", " five"], "gold": 0}]


def user_task(tmp: Path, rows=MC_ROWS, text: str | None = None, yaml: str = MC_TASK) -> Path:
    d = tmp / "tasks"
    d.mkdir(exist_ok=True)
    (d / "my_mc.yaml").write_text(yaml)
    (d / "data.jsonl").write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in rows))
    return d


def model_copy(tmp: Path, tiny: Path, damage) -> str:
    d = tmp / "model"
    shutil.copytree(tiny, d)
    damage(d)
    return str(d)


def truncate_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])


def write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def latin1(tmp: Path) -> str:
    (tmp / "d.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    return str(tmp / "d.jsonl")


SUITE_OK = "name: s\ntasks:\n  - {task: qeval_analogy, limit: 2, batch_size: 2}\n"


def _run(*extra):
    return ["run", "--formats", "none", "--suite", "smoke", *extra]


HUB_TASK = MC_TASK.replace("task: my_mc", "task: hub_mc").replace(
    "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\n",
    "dataset_path: someorg/somedata\ndataset_name: x\n")


def mirror_plan(tmp: Path, model: str, mirror: str) -> str:
    """A plan whose suite reads a hub dataset, with `data_mirror:` (an empty folder named `mirror`)."""
    (tmp / "mirror").mkdir(exist_ok=True)
    (tmp / "hub").mkdir(exist_ok=True)
    (tmp / "hub" / "hub_mc.yaml").write_text(HUB_TASK)
    write(tmp, "hub-suite.yaml", "name: s\ninclude_path: hub\ntasks:\n  - {task: hub_mc}\n")
    return f"models: [{model}]\nformats: [none]\nsuite: {tmp / 'hub-suite.yaml'}\ndata_mirror: {tmp / mirror}\n"


def _plan(tmp, text):
    return ["run", "--plan", write(tmp, "plan.yaml", text)]



# --- hostile YAML (qeval.core.yaml_safe) and values checkable before the store (issue 23) ---
def alias_bomb(levels: int = 9) -> str:
    """`j` expands to 10**9 scalars: "billion laughs" (a few hundred bytes)."""
    out = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, levels + 1):
        out += f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 10)}]\n"
    return out


def write_bytes(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _suite(tmp: Path, m: str, text: str | bytes) -> list[str]:
    path = write_bytes(tmp, "s.yaml", text if isinstance(text, bytes) else text.encode())
    return ["run", "--model", m, "--formats", "none", "--suite", path]


def _task(tmp: Path, m: str, yaml: str, extra: dict[str, str | bytes] | None = None) -> list[str]:
    """--tasks my_mc from a user folder holding `yaml` (and `extra` files, relative to tmp)."""
    d = user_task(tmp, yaml=yaml)
    for rel, text in (extra or {}).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["run", "--model", m, "--formats", "none", "--tasks", "my_mc", "--include-path", str(d)]


MARKER_MODULE = "from pathlib import Path\nPath({marker!r}).write_text('imported')\ndef f(ds):\n    return ds\n"
TRAIN_ROWS = "".join(json.dumps({"text": f"row {i} says hello."}) + "\n" for i in range(10))


def _adapter(tmp: Path, m: str, spec: str, rows: str | None = None) -> list[str]:
    data = write(tmp, "train.jsonl", rows if rows is not None else TRAIN_ROWS)
    return _plan(tmp, f"models: [{m}]\nformats: [none]\nsuite: smoke\ndevice: cpu\n"
                      f"adapters: {{a: {{train_data: {data}, {spec}}}}}\narms: [{{name: x, quant: none, adapter: a}}]\n")


def _mirror_split_twice(tmp: Path, m: str) -> list[str]:
    argv = _plan(tmp, mirror_plan(tmp, m, "mirror"))
    d = tmp / "mirror" / "someorg__somedata" / "x"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text(json.dumps(MC_ROWS[0]) + "\n")
    (d / "test.parquet").write_bytes(b"PAR1")
    return argv


PLAN_OK = "formats: [none]\nsuite: smoke\n"

_HAS_HQQ = importlib.util.find_spec("hqq") is not None  # an optional extra

# (id, argv builder (tmp, tiny_model) -> argv without --store, store kind, substrings the message must hold)
# store kind: "absent" (a path that must stay absent) or "existing" (a real store that must stay byte-identical)
CASES = [
    # --- run: flags ---
    ("formats-empty", lambda t, m: ["run", "--model", m, "--formats", ""], "absent", ["--formats", "''"]),
    ("formats-typo", lambda t, m: ["run", "--model", m, "--formats", "bnb-nf44"], "existing", ["bnb-nf44", "bnb-nf4"]),
    ("formats-backend-typo", lambda t, m: ["run", "--model", m, "--formats", "torchoa:int8-wo"], "existing", ["torchoa", "torchao"]),
    ("formats-backend-option", lambda t, m: ["run", "--model", m, "--formats", "quanto:int4:64"], "absent", ["64", "gN"]),
    ("formats-group-not-dividing", lambda t, m: ["run", "--model", m, "--formats", "none,gguf:q4_0,quanto:int4:g48"], "existing",
     ["group/block size 48", "down_proj (128)"]),
    # GPTQ quantizes in an isolated venv: its absence is one line naming the command that creates it
    ("gptq-env-missing", lambda t, m: ["run", "--model", m, "--formats", "none,gptq:w4:g16"], "existing",
     ["gptq:w4:g16", "qeval setup --backend gptq"]),
    ("calibration-unknown-key", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\ncalibration: {{sampels: 8}}\n"),
     "existing", ["sampels", "samples"]),
    ("calibration-bad-values", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\ncalibration: {{data: lee_backgrond, seq_len: 0}}\n"),
     "absent", ["lee_backgrond", "lee_background", "calibration.seq_len", "positive"]),
    # the hqq extra is optional (not in make setup): without it the first problem is the package
    ("formats-hqq-group-not-dividing", lambda t, m: ["run", "--model", m, "--formats", "none,hqq:4bit:g48"], "existing",
     ["hqq:4bit:g48", "group/block size 48", "down_proj (128)"] if _HAS_HQQ else
     ["hqq:4bit:g48", "pip install 'qeval[hqq]'"]),
    ("formats-hqq-group-not-multiple-of-8", lambda t, m: ["run", "--model", m, "--formats", "hqq:2bit:g20"], "absent",
     ["g20", "multiple of 8", "hqq:2bit:g64"]),
    ("formats-cuda-only-on-cpu", lambda t, m: ["run", "--model", m, "--formats", "none,torchao:int4-tinygemm:g64",
                                               "--device", "cpu"], "existing", ["torchao:int4-tinygemm:g64", "needs CUDA"]),
    ("formats-duplicate", lambda t, m: ["run", "--model", m, "--formats", "none,none"], "absent", ["arm name", "none"]),
    ("suite-unknown", lambda t, m: ["run", "--model", m, "--suite", "smokey"], "existing", ["smokey", "smoke"]),
    ("suite-file-missing", lambda t, m: ["run", "--model", m, "--suite", str(t / "nope.yaml")], "absent", ["nope.yaml"]),
    ("task-unknown", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogi"], "absent", ["qeval_analogi", "--include-path"]),
    ("tasks-and-suite", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogy", "--suite", "smoke"], "absent", ["--tasks"]),
    ("limit-without-tasks", lambda t, m: ["run", "--model", m, "--limit", "5"], "absent", ["--limit", "5"]),
    ("limit-zero", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogy", "--limit", "0"], "absent", ["limit", "0"]),
    ("batch-size-zero", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogy", "--batch-size", "0"], "absent", ["batch_size"]),
    ("fewshot-negative", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogy", "--num-fewshot", "-1"], "absent", ["num_fewshot", "-1"]),
    ("limit-not-a-number", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogy", "--limit", "ten"], "absent", ["ten"]),
    ("device-unknown", lambda t, m: ["run", "--model", m, "--device", "tpu"], "absent", ["tpu"]),
    ("executor-typo", lambda t, m: ["run", "--model", m, "--executor", "rey"], "existing", ["rey", "did you mean 'ray'"]),
    ("address-without-ray", lambda t, m: ["run", "--model", m, "--address", "auto"], "absent", ["--address", "--executor ray"]),
    ("include-path-missing", lambda t, m: _run("--model", m, "--include-path", str(t / "none")), "existing", ["include", "none"]),
    # --- run: models ---
    ("model-path-missing", lambda t, m: _run("--model", str(t / "no-such-model")), "absent", ["no-such-model", "check the path"]),
    ("model-name-unknown", lambda t, m: _run("--model", "smolm2"), "existing", ["smolm2", "embedded"]),
    ("gguf-missing", lambda t, m: _run("--model", str(t / "x.gguf")), "absent", ["x.gguf", ".gguf"]),
    ("gguf-corrupt", lambda t, m: _run("--model", write(t, "bad.gguf", "not a gguf")), "absent", ["bad.gguf", "GGUF file"]),
    ("hub-id-offline", lambda t, m: _run("--model", "someorg/somemodel"), "absent", ["someorg/somemodel", "offline"]),
    ("model-no-config", lambda t, m: _run("--model", model_copy(t, m, lambda d: (d / "config.json").unlink())), "existing", ["config.json"]),
    ("model-bad-config", lambda t, m: _run("--model", model_copy(t, m, lambda d: (d / "config.json").write_text("{oops"))), "absent", ["config.json", "JSON"]),
    ("model-no-tokenizer", lambda t, m: _run("--model", model_copy(t, m, lambda d: [f.unlink() for f in d.glob("tokenizer*")])), "existing", ["tokenizer"]),
    ("model-no-weights", lambda t, m: _run("--model", model_copy(t, m, lambda d: (d / "model.safetensors").unlink())), "absent", ["weight files"]),
    ("weights-truncated", lambda t, m: _run("--model", model_copy(t, m, truncate_weights)), "existing", ["model.safetensors", "truncated"]),
    ("weights-garbage", lambda t, m: _run("--model", model_copy(t, m, lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64))), "absent", ["model.safetensors", "safetensors"]),
    # --- data mirror / chat settings ---
    ("mirror-dataset-missing", lambda t, m: _plan(t, mirror_plan(t, m, "mirror")), "existing",
     ["someorg/somedata", "someorg__somedata/x", "mirror"]),
    ("mirror-folder-missing", lambda t, m: _plan(t, mirror_plan(t, m, "no-such-mirror")), "absent",
     ["data_mirror", "no-such-mirror", "existing folder"]),
    ("primary-metric-unknown", lambda t, m: ["run", "--model", m, "--formats", "none", "--suite", write(
        t, "s.yaml", "name: s\ntasks:\n  - {task: qeval_analogy, limit: 2, primary_metric: acc_nrom}\n")],
     "existing", ["primary_metric", "acc_nrom", "acc_norm"]),
    ("multiturn-without-chat-template", lambda t, m: ["run", "--model", m, "--formats", "none", "--suite", write(
        t, "s.yaml", "name: s\ntasks:\n  - {task: qeval_analogy, limit: 2, fewshot_as_multiturn: true}\n")],
     "absent", ["fewshot_as_multiturn", "apply_chat_template"]),
    # --- plan YAML ---
    ("plan-missing", lambda t, m: ["run", "--plan", str(t / "plan.yaml")], "absent", ["plan.yaml", "existing YAML"]),
    ("plan-malformed", lambda t, m: _plan(t, "models: [a\n"), "absent", ["malformed plan YAML", "line"]),
    ("plan-not-mapping", lambda t, m: _plan(t, "- a\n- b\n"), "absent", ["list", "mapping"]),
    ("plan-unknown-key", lambda t, m: _plan(t, f"models: [{m}]\nformat: [none]\n"), "existing", ["format", "formats"]),
    ("plan-wrong-type", lambda t, m: _plan(t, f"models: [{m}]\nseed: abc\n"), "absent", ["seed", "abc", "int"]),
    ("plan-formats-empty", lambda t, m: _plan(t, f"models: [{m}]\nformats: []\n"), "absent", ["formats", "at least one"]),
    ("plan-models-empty", lambda t, m: _plan(t, "models: []\nformats: [none]\n"), "absent", ["models", "at least one"]),
    ("plan-adapter-bad-lr", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nadapters: {{a: {{lr: -1}}}}\n"
                                                  "arms: [{name: x, quant: none, adapter: a}]\n"), "absent", ["lr", "-1"]),
    ("plan-train-data-hub-offline", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nadapters: {{a: {{train_data: org/some_dataset}}}}\n"
                                                          "arms: [{name: x, quant: none, adapter: a}]\n"), "absent", ["org/some_dataset", "offline", "to_json"]),
    ("plan-train-data-not-utf8", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nadapters: {{a: {{train_data: {latin1(t)}}}}}\n"
                                                        "arms: [{name: x, quant: none, adapter: a}]\n"), "absent", ["d.jsonl:1", "UTF-8"]),
    ("plan-peft-unknown-option", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nadapters: {{a: {{peft: {{use_dorra: true}}}}}}\n"
                                                        "arms: [{name: x, quant: none, adapter: a}]\n"), "absent", ["use_dorra", "did you mean 'use_dora'"]),
    ("plan-domain-task-unknown", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nadapters: {{a: {{domain_tasks: [qeval_lee_pl]}}}}\n"
                                                        "arms: [{name: x, quant: none, adapter: a}]\n"), "absent", ["qeval_lee_pl", "did you mean 'qeval_lee_ppl'"]),
    ("plan-arm-unknown-adapter", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\narms: [{{name: x, adapter: nope}}]\n"), "absent", ["nope", "adapters"]),
    ("plan-arm-merge-int8", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nadapters: {{a: {{train_quant: bnb-int8}}}}\n"
                                                   "arms: [{name: x, quant: bnb-int8, adapter: a, merge: requantized}]\n"), "absent", ["merge", "bnb-int8", "dequantize"]),
    ("plan-arm-bad-merge", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\narms: [{{name: x, merge: sideways}}]\n"), "absent", ["sideways"]),
    ("plan-include-path-missing", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\ninclude_path: nowhere\n"), "existing", ["nowhere", "folder"]),
    ("plan-device-unknown", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\ndevice: tpu\n"), "absent", ["tpu", "auto, cpu or cuda"]),
    ("plan-compute-dtype-typo", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\ncompute_dtype: bf61\n"), "absent", ["bf61", "did you mean 'bf16'"]),
    # refused for the adapters on a bf16 CPU, for the ISA elsewhere: one compute_dtype line either way
    ("plan-bf16-with-adapters-on-cpu", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\ndevice: cpu\n"
     "compute_dtype: bf16\nadapters: {a: {}}\n"), "absent", ["compute_dtype", "bf16"]),
    ("run-compute-dtype-choice", lambda t, m: ["run", "--model", m, "--compute-dtype", "fp8"], "absent", ["--compute-dtype", "fp8"]),
    ("plan-ray-unknown-key", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nexecutor: ray\nray: {{adress: auto}}\n"), "absent", ["adress", "address"]),
    ("plan-ray-negative-cpus", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nray: {{cpus_per_job: -1}}\n"), "absent", ["ray.cpus_per_job", "-1"]),
    ("plan-retries-negative", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nretries: -1\n"), "absent", ["retries", "-1", "0 or more"]),
    ("plan-seed-negative", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nseed: -5\n"), "absent", ["seed", "-5", "0 or more"]),
    # --- suite YAML ---
    ("suite-no-tasks", lambda t, m: ["run", "--model", m, "--suite", write(t, "s.yaml", "name: s\ntasks: []\n")], "absent", ["at least one task"]),
    ("suite-task-unknown-key", lambda t, m: ["run", "--model", m, "--suite", write(t, "s.yaml", "name: s\ntasks:\n  - {task: qeval_analogy, limt: 3}\n")], "absent", ["limt", "limit"]),
    ("suite-batch-size-typo", lambda t, m: ["run", "--model", m, "--suite", write(t, "s.yaml", "name: s\ntasks:\n  - {task: qeval_lee_ppl, batch_size: autoo}\n")], "absent", ["batch_size", "autoo", "auto"]),
    ("suite-duplicate-task", lambda t, m: ["run", "--model", m, "--suite", write(t, "s.yaml", SUITE_OK + "  - {task: qeval_analogy, limit: 3}\n")], "existing", ["at most once"]),
    ("suite-missing-name", lambda t, m: ["run", "--model", m, "--suite", write(t, "s.yaml", "tasks:\n  - {task: qeval_analogy}\n")], "absent", ["'name'"]),
    ("suite-include-path-missing", lambda t, m: ["run", "--model", m, "--suite", write(t, "s.yaml", SUITE_OK + "include_path: gone\n")], "absent", ["gone"]),
    # --- task YAML and data files ---
    ("task-data-empty", lambda t, m: ["run", "--model", m, "--formats", "none", "--tasks", "my_mc", "--include-path", str(user_task(t, text=""))], "existing", ["data.jsonl", "empty"]),
    ("task-gold-out-of-range", lambda t, m: ["run", "--model", m, "--formats", "none", "--tasks", "my_mc", "--include-path",
                                             str(user_task(t, rows=[{**MC_ROWS[0], "gold": 2}]))], "absent", ["gold", "2", "0..1"]),
    ("task-gold-negative", lambda t, m: ["run", "--model", m, "--formats", "none", "--tasks", "my_mc", "--include-path",
                                         str(user_task(t, rows=[MC_ROWS[0], {**MC_ROWS[1], "gold": -1}]))], "absent", ["gold", "-1", "line 2"]),
    ("task-data-not-json", lambda t, m: ["run", "--model", m, "--formats", "none", "--tasks", "my_mc", "--include-path",
                                         str(user_task(t, text='{"q": "x", "choices": [" a"], "gold": 0}\nnot json\n'))], "absent", ["line", "2", "JSON"]),
    ("task-data-missing", lambda t, m: ["run", "--model", m, "--formats", "none", "--tasks", "my_mc", "--include-path",
                                        str(user_task(t, yaml=MC_TASK.replace("data.jsonl", "other.jsonl")))], "absent", ["other.jsonl", "existing file"]),
    ("task-outside-include-path", lambda t, m: ["run", "--model", m, "--formats", "none", "--tasks", "my_mc"], "absent", ["my_mc", "--include-path"]),
    # --- store paths ---
    ("store-is-folder", lambda t, m: _run("--model", m), "folder", ["folder"]),
    ("store-not-sqlite", lambda t, m: _run("--model", m), "text", ["SQLite"]),
    ("store-read-only", lambda t, m: _run("--model", m), "readonly", ["writable"]),
    ("store-parent-is-file", lambda t, m: _run("--model", m), "under-file", ["is a file"]),
    ("report-store-missing", lambda t, m: ["report", "--out", str(t / "out")], "absent", ["an existing store"]),
    ("report-store-empty-file", lambda t, m: ["report", "--out", str(t / "out")], "empty", ["empty"]),
    ("report-store-not-sqlite", lambda t, m: ["report", "--out", str(t / "out")], "text", ["SQLite"]),
    ("report-store-foreign-sqlite", lambda t, m: ["report", "--out", str(t / "out")], "foreign", ["qeval result store"]),
    ("report-out-is-file", lambda t, m: ["report", "--out", write(t, "out.txt", "a file")], "existing", ["out.txt", "is a file"]),
    ("report-memory-budget-negative", lambda t, m: ["report", "--memory-budget", "-1"], "existing", ["-1", "positive"]),
    ("gc-store-missing", lambda t, m: ["gc", "--dry-run"], "absent", ["an existing store"]),
    # --- nightly ---
    ("nightly-plan-missing", lambda t, m: ["nightly", str(t / "nightly.yaml")], "existing", ["nightly.yaml"]),
    ("nightly-unknown-threshold-key", lambda t, m: ["nightly", write(t, "n.yaml", f"models: [{m}]\nformats: [none]\nthresholds: {{max_dorp: 1}}\n")],
     "absent", ["max_dorp"]),
    ("nightly-store-not-sqlite", lambda t, m: ["nightly", write(t, "n.yaml", f"models: [{m}]\nformats: [none]\nsuite: smoke\n")], "text", ["SQLite"]),
    ("nightly-per-arm-typo", lambda t, m: ["nightly", write(t, "n.yaml", f"models: [{m}]\nformats: [none, bnb-nf4]\n"
                                                            "thresholds: {per_arm: {bnb-nf44: 0.5}}\n")],
     "absent", ["bnb-nf44", "bnb-nf4"]),
    ("nightly-warn-below-typo", lambda t, m: ["nightly", write(t, "n.yaml", f"models: [{m}]\nformats: [none]\nsuite: smoke\n"
                                                               "thresholds: {warn_below: {'qeval_analogi:acc': 0.3}}\n")],
     "absent", ["qeval_analogi"]),
    ("nightly-ack-store-missing", lambda t, m: ["nightly", write(t, "n.yaml", "formats: [none]\n"), "--ack",
                                                 "m @ bnb-nf4 / qeval_analogy", "--reason", "known loss"],
     "absent", ["an existing store"]),
    ("nightly-ack-without-reason", lambda t, m: ["nightly", write(t, "n.yaml", "formats: [none]\n"), "--ack", "x"],
     "existing", ["--reason"]),
    ("nightly-reason-without-ack", lambda t, m: ["nightly", write(t, "n.yaml", "formats: [none]\n"), "--reason", "x"],
     "absent", ["--ack"]),
    # --- benchmarks: every option checked before anything is measured ---
    ("bench-gates-nights-zero", lambda t, m: ["bench-gates", "--nights", "0"], "absent", ["'0'", "1 or more"]),
    ("bench-eval-scale-zero", lambda t, m: ["bench", "--eval-scale", "0"], "absent", ["'0'", "fraction"]),
    ("bench-formats-empty", lambda t, m: ["bench", "--model", m, "--formats", ""], "absent", ["--formats"]),
    ("bench-eval-formats-typo", lambda t, m: ["bench", "--model", m, "--formats", "none", "--eval-formats", "bnb-nf44"],
     "absent", ["bnb-nf44", "bnb-nf4"]),
    ("setup-backend-unknown", lambda t, m: ["setup", "--backend", "gguf-q"], "absent", ["gguf-q", "gguf-k"]),

    # --- hostile YAML: one line, exit 2, before anything runs (qeval.core.yaml_safe) ---
    ("plan-alias-bomb", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + alias_bomb() + "thresholds: {per_arm: *j}\n"),
     "absent", ["plan.yaml", "100,000 nodes", "aliases"]),
    ("plan-recursive-alias", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "arms: &x [*x]\n"), "absent", ["*x", "recursive"]),
    ("plan-duplicate-key", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nsuite: smoke\nformats: [bnb-nf4]\n"),
     "absent", ["'formats'", "line 4", "first on line 2"]),
    ("plan-duplicate-nested-key", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "ray: {num_cpus: 1, num_cpus: 2}\n"),
     "existing", ["'num_cpus'", "line 4"]),
    ("plan-deep-flow-nesting", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "thresholds: " + "[" * 3000 + "]" * 3000 + "\n"),
     "absent", ["deeper than 64", "line 4"]),
    ("plan-deep-block-nesting", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "arms:\n" + "".join("  " * i + "-\n" for i in range(1, 120))),
     "absent", ["deeper than 64"]),
    ("plan-not-utf8", lambda t, m: ["run", "--plan", write_bytes(t, "plan.yaml", f"models: [{m}]\nformats: [none]\n# caf\xe9\n".encode("latin-1"))],
     "absent", ["plan.yaml", "UTF-8", "line 3", "iconv"]),
    ("plan-too-big", lambda t, m: ["run", "--plan", write_bytes(t, "plan.yaml", b"formats: [none]\n" + b"#" * (3 * 1024 * 1024))],
     "absent", ["plan.yaml", "2,048 KiB"]),
    ("plan-int-tag-not-int", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "seed: !!int abc\n"), "absent", ["plan.yaml", "tags"]),
    ("plan-timestamp-tag-bad", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "seed: !!timestamp 2020-13-45x\n"), "absent", ["plan.yaml", "tags"]),
    ("plan-python-tag", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "seed: !!python/object/apply:os.system [ls]\n"),
     "absent", ["malformed plan YAML", "python/object"]),
    ("suite-alias-bomb", lambda t, m: _suite(t, m, "name: s\n" + alias_bomb() + "description: *j\ntasks: [{task: qeval_analogy}]\n"),
     "absent", ["s.yaml", "100,000 nodes"]),
    ("suite-duplicate-key", lambda t, m: _suite(t, m, SUITE_OK + "name: t\n"), "existing", ["'name'", "line 4", "first on line 1"]),
    ("suite-not-utf8", lambda t, m: _suite(t, m, "name: caf\xe9\ntasks: [{task: qeval_analogy}]\n".encode("latin-1")), "absent", ["s.yaml", "UTF-8"]),
    ("suite-deep-nesting", lambda t, m: _suite(t, m, SUITE_OK + "description: " + "{a: " * 200 + "1" + "}" * 200 + "\n"), "absent", ["deeper than 64"]),
    ("task-yaml-duplicate-key", lambda t, m: _task(t, m, MC_TASK + "output_type: generate_until\n"), "absent", ["'output_type'", "my_mc.yaml"]),
    ("task-folder-alias-bomb", lambda t, m: _task(t, m, MC_TASK, {"tasks/notes.yaml": alias_bomb() + "x: *j\n"}), "absent", ["notes.yaml", "100,000 nodes"]),
    ("task-folder-not-utf8", lambda t, m: _task(t, m, MC_TASK, {"tasks/other.yaml": b"a: \xe9\n"}),
     "absent", ["other.yaml", "UTF-8"]),
    # --- where task code runs: nothing imported from a folder the user did not name ---
    ("task-function-module-missing", lambda t, m: _task(t, m, MC_TASK + "process_docs: !function nothere.f\n"), "absent",
     ["nothere.f", "nothere.py", "--include-path"]),
    ("task-function-module-in-cwd", lambda t, m: _task(t, m, MC_TASK + "process_docs: !function evil.f\n",
                                                       {"work/evil.py": MARKER_MODULE.format(marker=str(t / "imported"))}),
     "absent", ["evil.f", "evil.py"]),
    ("task-function-escapes-folder", lambda t, m: _task(t, m, MC_TASK + f"process_docs: !function .{str(t).replace('/', '.')}.evil.f\n",
                                                        {"evil.py": MARKER_MODULE.format(marker=str(t / "imported"))}),
     "absent", ["evil.f", "--include-path"]),
    ("task-include-outside-folder", lambda t, m: _task(t, m, MC_TASK.replace("task: my_mc\n", "task: my_mc\ninclude: ../other/base.yaml\n"),
                                                       {"other/base.yaml": "process_docs: !function evil.f\n",
                                                        "other/evil.py": MARKER_MODULE.format(marker=str(t / "imported"))}),
     "absent", ["base.yaml", "--include-path"]),
    ("include-path-is-file", lambda t, m: _run("--model", m, "--include-path", write(t, "f.yaml", "a: 1\n")), "absent", ["f.yaml", "folder"]),
    # --- nightly thresholds ---
    ("nightly-thresholds-alias-bomb", lambda t, m: ["nightly", write(t, "n.yaml", f"models: [{m}]\n" + PLAN_OK + alias_bomb()
                                                                     + "thresholds: {warn_below: *j}\n")], "absent", ["n.yaml", "100,000 nodes"]),
    ("nightly-duplicate-threshold", lambda t, m: ["nightly", write(t, "n.yaml", f"models: [{m}]\n" + PLAN_OK
                                                                   + "thresholds: {min_recovery: 0.9, min_recovery: 0.1}\n")], "absent", ["'min_recovery'"]),
    # --- numeric ranges: refused before the store, not when the cell runs ---
    ("limit-huge", lambda t, m: ["run", "--model", m, "--formats", "none", "--tasks", "qeval_analogy", "--limit", "99999999999999999999"],
     "absent", ["limit", "99999999999999999999", "1,000,000,000"]),
    ("num-fewshot-huge", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogy", "--num-fewshot", "100000"], "absent", ["num_fewshot", "100000"]),
    ("batch-size-huge", lambda t, m: ["run", "--model", m, "--tasks", "qeval_analogy", "--batch-size", "10000000"], "absent", ["batch_size", "10000000"]),
    ("suite-limit-huge", lambda t, m: _suite(t, m, "name: s\ntasks:\n  - {task: qeval_analogy, limit: 1e30}\n"), "absent", ["limit", "1e30"]),
    ("suite-limit-int-huge", lambda t, m: _suite(t, m, "name: s\ntasks:\n  - {task: qeval_analogy, limit: 99999999999999999999}\n"),
     "existing", ["limit", "99999999999999999999"]),
    ("plan-seed-huge", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "seed: 99999999999\n"), "absent", ["seed", "99999999999", "4,294,967,295"]),
    ("plan-bootstrap-huge", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "bootstrap_iters: 10000000000\n"), "absent", ["bootstrap_iters", "10000000000"]),
    ("plan-retries-huge", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "retries: 1000000\n"), "absent", ["retries", "1000000"]),
    ("plan-ray-cpus-huge", lambda t, m: _plan(t, f"models: [{m}]\n" + PLAN_OK + "ray: {num_cpus: 1e12}\n"), "absent", ["ray.num_cpus"]),
    ("adapter-steps-huge", lambda t, m: _adapter(t, m, "steps: 100000000000"), "absent", ["adapters.a.steps", "100000000000"]),
    ("adapter-lr-infinite", lambda t, m: _adapter(t, m, "lr: .inf"), "absent", ["adapters.a.lr", "inf", "finite"]),
    ("adapter-seed-huge", lambda t, m: _adapter(t, m, "seed: 99999999999"), "absent", ["adapters.a.seed", "99999999999"]),
    ("adapter-paged-optimizer-on-cpu", lambda t, m: _adapter(t, m, "optimizer: paged_adamw8bit"), "absent",
     ["adapters.a.optimizer", "paged_adamw8bit", "CUDA", "adamw8bit"]),
    ("adapter-offload-on-cpu", lambda t, m: _adapter(t, m, "offload_activations: true"), "absent",
     ["adapters.a.offload_activations", "CUDA"]),
    ("adapter-optimizer-typo", lambda t, m: _adapter(t, m, "optimizer: adamw_8bit"), "absent",
     ["adapters.a.optimizer", "adamw_8bit", "adamw8bit"]),
    ("adapter-seeds-huge", lambda t, m: _adapter(t, m, "seeds: [1, 99999999999]"), "absent", ["adapters.a.seeds", "99999999999"]),
    ("adapter-budget-tokens-huge", lambda t, m: _adapter(t, m, "budget_tokens: 10000000000000000"), "absent", ["budget_tokens"]),
    # the tiny model's context is 1,024 tokens (max_position_embeddings): read from config.json, no weights
    ("adapter-seq-len-over-context", lambda t, m: _adapter(t, m, "seq_len: 4096"), "absent", ["adapters.a.seq_len", "4096", "1,024"]),
    ("adapter-seq-len-over-data", lambda t, m: _adapter(t, m, "seq_len: 1000"), "absent", ["adapters.a.seq_len", "1000", "no full block"]),
    ("mirror-is-file", lambda t, m: _plan(t, f"models: [{m}]\nformats: [none]\nsuite: smoke\ndata_mirror: {write(t, 'mirror.txt', 'x')}\n"),
     "absent", ["data_mirror", "mirror.txt", "existing folder"]),
    ("mirror-split-twice", _mirror_split_twice, "absent", ["test.parquet", "one file per split"]),
    # --- the command line itself ---
    ("unknown-command", lambda t, m: ["runn"], "absent", ["runn"]),
    ("unknown-flag", lambda t, m: ["run", "--modle", m], "absent", ["--modle"]),
]


def _ids(c):
    return c.id if hasattr(c, "id") else c[0]


def _make_store(kind: str, path: Path) -> Path:
    """Put the store in its starting state; returns the path passed as --store."""
    if kind == "existing":
        with Store(path):
            pass
    elif kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("these are my notes, not a database\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "readonly":
        with Store(path):
            pass
        path.chmod(0o444)
    elif kind == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE notes (x TEXT)")
        db.commit()
        db.close()
    elif kind == "under-file":
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        path.parent.write_text("a file where a folder should be")
    return path


def _snapshot(path: Path):
    if path.is_file():
        return path.read_bytes()
    if path.is_dir():
        return sorted(p.name for p in path.iterdir())
    return None


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input(case, tmp_path, tiny_model_dir, capsys, monkeypatch):
    name, build, store_kind, needles = case
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # relative defaults (./results, ./reports) land here, nowhere else
    store = tmp_path / "st" / ("sub" if store_kind == "under-file" else "") / "store.sqlite"
    store.parent.mkdir(parents=True, exist_ok=True) if store_kind != "under-file" else None
    _make_store(store_kind, store)
    before = _snapshot(store)
    argv = build(tmp_path, str(tiny_model_dir))
    store_flag = [] if argv[0] in ("runn", "bench", "setup") else ["--store", str(store)]  # bench, setup: no store
    try:
        code = main(argv + store_flag)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and all(line.startswith("qeval: error: ") for line in lines), err
    text = " ".join(lines)
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    assert _snapshot(store) == before, "the store changed"
    assert not (work / "results").exists() and not (work / "reports").exists()


def test_case_count():
    assert len(CASES) >= 105  # issue 23: every option and failure class


def test_include_path_task_runs_and_is_fingerprinted(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A user's own task in their own folder: runs offline, from any working directory; its key
    follows the task's data."""
    from qeval.eval.suites import task_fingerprint

    tasks = user_task(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--model", str(tiny_model_dir), "--formats", "none", "--tasks", "my_mc",
            "--include-path", "tasks", "--store", str(tmp_path / "s.sqlite")]
    assert main(argv) == 0, capsys.readouterr().err
    with Store(tmp_path / "s.sqlite", readonly=True) as s:
        (rec,) = list(s.records())
    assert rec.task.name == "my_mc" and rec.n == 2
    before = task_fingerprint("my_mc", (tasks.resolve(),))
    assert rec.task.fingerprint == before
    (tasks / "data.jsonl").write_text((tasks / "data.jsonl").read_text() + json.dumps(MC_ROWS[0]) + "\n")
    assert task_fingerprint("my_mc", (tasks.resolve(),)) != before


@pytest.mark.parametrize("value", ["lots", "-5"])
def test_bad_reference_cache_budget_is_one_line_before_the_store(value, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """$QEVAL_REFERENCE_CACHE_MB is checked with the plan, before any load or store write."""
    monkeypatch.setenv("QEVAL_REFERENCE_CACHE_MB", value)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store.sqlite"
    code = main(["run", "--model", str(tiny_model_dir), "--formats", "none", "--suite", "smoke", "--store", str(store)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "QEVAL_REFERENCE_CACHE_MB" in lines[0] and value in lines[0]
    assert "whole number of MiB" in lines[0] and not store.exists()


def test_gguf_k_quant_without_the_ggml_library(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A K-quant format on a machine where llama.cpp's ggml is not built: one line naming the command
    that builds it, exit 2, before any store is made."""
    monkeypatch.setenv("QEVAL_GGML_LIB", str(tmp_path / "absent" / "libggml-base.so"))
    store = tmp_path / "st" / "store.sqlite"
    code = main(["run", "--model", str(tiny_model_dir), "--formats", "none,gguf:q4_k_m", "--suite", "smoke",
                 "--store", str(store)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qeval: error: "), err
    assert "gguf:q4_k_m" in err and "qeval setup --backend gguf-k" in err and "Traceback" not in err
    assert not store.exists()


@pytest.mark.parametrize("where", ["cwd", "sibling-include", "escape"])
def test_function_module_outside_named_folders_is_never_imported(where, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A `!function` module reachable only from a folder the user did not name (the working
    directory on sys.path, as under `python -m qeval`; a sibling folder pulled in by `include:`; a
    dotted name that climbs out) is refused before lm-eval loads the task: its side effect never
    happens."""
    marker = tmp_path / "imported"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))  # `python -m qeval` puts the working directory first
    module = MARKER_MODULE.format(marker=str(marker))
    if where == "cwd":
        argv = _task(tmp_path, str(tiny_model_dir), MC_TASK + "process_docs: !function evil.f\n", {"work/evil.py": module})
    elif where == "sibling-include":
        argv = _task(tmp_path, str(tiny_model_dir), MC_TASK.replace("task: my_mc\n", "task: my_mc\ninclude: ../other/base.yaml\n"),
                     {"other/base.yaml": "process_docs: !function evil.f\n", "other/evil.py": module})
    else:
        argv = _task(tmp_path, str(tiny_model_dir), MC_TASK + f"process_docs: !function .{str(tmp_path).replace('/', '.')}.evil.f\n",
                     {"evil.py": module})
    store = tmp_path / "s.sqlite"
    code = main(argv + ["--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert not marker.exists(), "a module outside the named folders was imported"
    assert not store.exists()


def test_function_module_in_the_named_folder_is_imported(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The other side: a folder named with --include-path is code; its `!function` module runs."""
    marker = tmp_path / "imported"
    monkeypatch.chdir(tmp_path)
    argv = _task(tmp_path, str(tiny_model_dir), MC_TASK + "process_docs: !function helper.f\n",
                 {"tasks/helper.py": MARKER_MODULE.format(marker=str(marker))})
    assert main(argv + ["--limit", "1", "--store", str(tmp_path / "s.sqlite")]) == 0, capsys.readouterr().err
    assert marker.read_text() == "imported"
