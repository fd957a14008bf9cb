"""The task-kind matrix for offline tests: lm-eval's OWN built-in YAML (copied verbatim from the
installed lm_eval package: filters, group config, metrics and helper modules unchanged) served
through qeval's data mirror from small local datasets in the same schema, built from the real text
of the suite data (gensim's test corpora: Mikolov analogies, capitals, Lee news).

| kind                               | lm-eval YAML                 | mirror folder                         |
|------------------------------------|------------------------------|---------------------------------------|
| generate_until + regex filters     | gsm8k/gsm8k.yaml             | openai__gsm8k/main                    |
| group of 3 subtasks (size-weighted)| mmlu/default/_mmlu_stem.yaml | cais__mmlu/{abstract_algebra,...}     |
| loglikelihood perplexity + acc     | lambada/lambada_openai.yaml  | EleutherAI__lambada_openai/default    |
| loglikelihood_rolling              | wikitext/wikitext.yaml       | EleutherAI__wikitext_document_level/… |
| corpus bleu / ter / chrf           | translation/wmt_common_yaml  | qeval-kit__lee_continuation/default   |
| f1 (tuple metric) + acc            | glue/mrpc/default.yaml       | nyu-mll__glue/mrpc                    |
| mcc (tuple metric)                 | glue/cola/default.yaml       | nyu-mll__glue/cola                    |
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import lm_eval

from qeval.data.suite_data import suite_data_dir

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
MMLU_SUBJECTS = {"abstract_algebra": "capital-common-countries", "anatomy": "currency", "astronomy": "family"}
MMLU_SIZES = {"abstract_algebra": 20, "anatomy": 12, "astronomy": 30}  # unequal: size weighting matters

KIT_TASKS = ["gsm8k", "mmlu_stem", "lambada_openai", "wikitext", "kit_bleu", "mrpc", "cola"]


def _rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (suite_data_dir() / name).read_text(encoding="utf-8").splitlines() if x.strip()]


def _write(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _sentences(n: int, lo: int = 8, hi: int = 30) -> list[str]:
    out = []
    for doc in _rows("lee_train.jsonl"):
        for s in re.split(r"(?<=[.!?])\s+", doc["text"]):
            words = s.split()
            if lo <= len(words) <= hi and '"' not in s:
                out.append(" ".join(words))
    random.Random(7).shuffle(out)
    return out[:n]


def build_kit(root: Path) -> tuple[Path, Path]:
    """Write the task YAML folder and the mirror under `root`; return (tasks_dir, mirror_dir)."""
    from qeval.data.suite_data import ensure_built

    ensure_built()
    tasks, mirror = root / "tasks", root / "mirror"
    tasks.mkdir(parents=True, exist_ok=True)
    copies = ["gsm8k/gsm8k.yaml", "lambada/lambada_openai.yaml", "wikitext/wikitext.yaml",
              "wikitext/preprocess_wikitext.py", "translation/wmt_common_yaml", "mmlu/default/_default_template_yaml",
              "mmlu/default/_mmlu_stem.yaml"] + [f"mmlu/default/mmlu_{s}.yaml" for s in MMLU_SUBJECTS]
    for rel in copies:
        shutil.copy(LM_EVAL_TASKS / rel, tasks / Path(rel).name)
    # the one edit: GSM8K generates up to 256 tokens by default; 16 keep the tiny model fast on CPU
    gsm = (tasks / "gsm8k.yaml").read_text(encoding="utf-8")
    assert "  do_sample: false\n" in gsm
    (tasks / "gsm8k.yaml").write_text(gsm.replace("  do_sample: false\n", "  do_sample: false\n  max_gen_toks: 16\n", 1),
                                      encoding="utf-8")
    for sub in ("mrpc", "cola"):
        (tasks / sub).mkdir(exist_ok=True)
        shutil.copy(LM_EVAL_TASKS / "glue" / sub / "default.yaml", tasks / sub / "default.yaml")
    # a BLEU generation task on lm-eval's own translation settings (wmt_common_yaml: bleu, ter, chrf)
    (tasks / "kit_bleu.yaml").write_text(
        "task: kit_bleu\ndataset_path: qeval-kit/lee_continuation\ninclude: wmt_common_yaml\n"
        "doc_to_text: 'Text: {{prefix}}'\ndoc_to_target: ' {{suffix}}'\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n  max_gen_toks: 8\n", encoding="utf-8")

    capitals = _rows("capitals.jsonl")
    # GSM8K schema: question, answer ending in "#### <number>" (letters in a capital's name)
    gsm = [{"question": f"How many letters are in the name of the capital of {r['country']}, {r['capital']}?",
            "answer": f"{r['capital']} is spelled with {len(r['capital'])} letters.\n#### {len(r['capital'])}"}
           for r in capitals]
    _write(mirror / "openai__gsm8k" / "main", "train", gsm[:8])
    _write(mirror / "openai__gsm8k" / "main", "test", gsm[8:8 + 30])
    # MMLU schema: question, subject, choices, answer (index)
    analogy = [r for r in _rows("analogy.jsonl") if r["split"] == "test"]
    for subject, category in MMLU_SUBJECTS.items():
        rows = [{"question": f"{r['a']} is to {r['b']} as {r['c']} is to", "subject": subject,
                 "choices": r["choices"], "answer": r["gold"]} for r in analogy if r["category"] == category]
        _write(mirror / "cais__mmlu" / subject, "dev", rows[:5])
        _write(mirror / "cais__mmlu" / subject, "test", rows[5:5 + MMLU_SIZES[subject]])
    # LAMBADA schema: text (the last word is the target)
    _write(mirror / "EleutherAI__lambada_openai" / "default", "test", [{"text": s} for s in _sentences(40)])
    # WikiText document-level schema: page
    news = [r["text"][:300] for r in _rows("lee_news.jsonl")[:12]]
    folder = mirror / "EleutherAI__wikitext_document_level" / "wikitext-2-raw-v1"
    for split in ("train", "validation", "test"):
        _write(folder, split, [{"page": p} for p in news])
    # continuation "translation": the first 8 words -> the next 6
    cont = [{"prefix": " ".join(s.split()[:8]), "suffix": " ".join(s.split()[8:14])} for s in _sentences(120)[40:70]]
    for split in ("train", "validation", "test"):
        _write(mirror / "qeval-kit__lee_continuation" / "default", split, cont)
    # GLUE schemas: capital statements, true or with a wrong capital (label 1 = true / acceptable)
    rng = random.Random(3)
    stmts = []
    for i, r in enumerate(capitals[:60]):
        wrong = capitals[(i + 17) % len(capitals)]["capital"]
        ok = i % 2 == 0
        stmts.append((f"{r['capital'] if ok else wrong} is the capital of {r['country']}.", int(ok), r))
    rng.shuffle(stmts)
    cola = [{"sentence": s, "label": y, "idx": i} for i, (s, y, _) in enumerate(stmts)]
    _write(mirror / "nyu-mll__glue" / "cola", "train", cola[:10])
    _write(mirror / "nyu-mll__glue" / "cola", "validation", cola[10:])
    mrpc = [{"sentence1": s, "sentence2": f"The capital of {r['country']} is {r['capital']}.", "label": y, "idx": i}
            for i, (s, y, r) in enumerate(stmts)]
    _write(mirror / "nyu-mll__glue" / "mrpc", "train", mrpc[:10])
    _write(mirror / "nyu-mll__glue" / "mrpc", "validation", mrpc[10:])
    return tasks, mirror


def build_builtin_mirror(root: Path, per_subject: int = 2) -> Path:
    """A mirror for lm-eval's BUILT-IN gsm8k, mmlu (all its subjects, `per_subject` test rows each)
    and lambada_openai, in their schemas, from the same real text: `qeval run --tasks
    gsm8k,mmlu,lambada_openai` runs offline from it."""
    from qeval.data.suite_data import ensure_built

    ensure_built()
    scratch, mirror = root / "scratch", root / "mirror"
    _, kit_mirror = build_kit(scratch)
    shutil.copytree(kit_mirror / "openai__gsm8k", mirror / "openai__gsm8k")
    shutil.copytree(kit_mirror / "EleutherAI__lambada_openai", mirror / "EleutherAI__lambada_openai")
    subjects = sorted(p.stem[len("mmlu_"):] for p in (LM_EVAL_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"))
    analogy = [r for r in _rows("analogy.jsonl") if r["split"] == "test"]
    step = per_subject + 5
    for i, subject in enumerate(subjects):
        rows = [{"question": f"{r['a']} is to {r['b']} as {r['c']} is to", "subject": subject,
                 "choices": r["choices"], "answer": r["gold"]} for r in analogy[i * step:(i + 1) * step]]
        _write(mirror / "cais__mmlu" / subject, "dev", rows[:5])
        _write(mirror / "cais__mmlu" / subject, "test", rows[5:])
    return mirror
