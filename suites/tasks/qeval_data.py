"""Dataset loaders and metric helpers for qeval's shipped lm-eval tasks.

lm-eval imports this module through `!function qeval_data.<name>` in the task YAML beside it. The
data files are built from installed packages by `qeval setup` (qeval/suite_data.py) into a
user-writable folder, never the installed package. A relative `data_file` is looked up in the
working directory first (qeval evaluates a task from its YAML's folder, so that means "beside the
YAML"), then in the built suite data; an absolute one is used as is.
"""
import json
import re
from pathlib import Path

import datasets


def _resolve(data_file):
    from qeval.suite_data import suite_data_dir

    path = Path(data_file).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), suite_data_dir()):
        if (base / path).is_file():
            return base / path
    return suite_data_dir() / path


_CACHE = {}  # (path, size, mtime) -> DatasetDict: the arms of one run read the same file once


def _load(data_file, **_ignored):
    path = _resolve(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"suite data {path} is missing: run `qeval setup` (or `make setup`) to build it")
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:  # Arrow datasets are immutable: one object can serve every evaluation
        _CACHE[key] = _build(path)
    return _CACHE[key]


def _build(path):
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    splits = {}
    for row in rows:
        splits.setdefault(row.get("split", "test"), []).append(row)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(r) for name, r in splits.items()})


def load_jsonl(**kwargs):
    """custom_dataset entry point: `dataset_kwargs: {data_file: NAME.jsonl}` in the task YAML."""
    return _load(**kwargs)


def perplexity_results(doc, results):
    """Word/byte perplexity of one document, counted on the original text (as lm-eval's wikitext)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"].strip()))
    nbytes = len(doc["text"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, nbytes),
        "bits_per_byte": (loglikelihood, nbytes),
    }
