"""Training data for adapters: a built-in corpus or the user's own JSONL, validated, split, tokenized, packed.

`train_data` in an adapter spec is either a built-in name (see BUILTIN; files built from the offline
gensim corpora by qeval.data.suite_data) or a local `.jsonl` file or folder of them. Each row is one of
three formats, detected from its fields (one format per source):

- `{"text": ...}`: plain text; the loss covers every token.
- `{"prompt": ..., "completion": ...}`: the loss covers the completion (and its EOS) only.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a chat, rendered with the model's own chat
  template; the loss covers the assistant turns only.

An optional `"split": "train" | "heldout"` on every row fixes the held-out rows; otherwise the
held-out split is deterministic: the HELDOUT_FRACTION of rows whose content hashes lowest (stable
when rows are reordered or appended elsewhere). Rows longer than `seq_len` are either packed
(`packing: pack`, the default: every example EOS-joined and cut into seq_len blocks, so long rows
span blocks and nothing is lost but the last partial block) or truncated (`packing: truncate`: one
example per block, cut at seq_len and right-padded, padding masked from the loss). The training log
says which, and how many rows were long. The data's content hash is part of the adapter's key.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qeval.core.errors import QevalError, QevalErrors, unknown_name
from qeval.core.files import content_key, sha256_file

# name -> file built by qeval.data.suite_data (all from the gensim test corpora, no invented text)
BUILTIN = {
    "lee_background": "lee_train.jsonl",  # text rows with a fixed split (the last 30 documents held out)
    "example-text": "train_text.jsonl",
    "example-prompt-completion": "train_prompt_completion.jsonl",
    "example-chat": "train_chat.jsonl",
}
DATA_FORMATS = ("text", "prompt_completion", "chat")
PACKINGS = ("pack", "truncate")
SPLITS = ("train", "heldout")
ROLES = ("system", "user", "assistant")
HELDOUT_FRACTION = 0.1
MAX_HELDOUT_BLOCKS = 16  # 2,048 tokens at seq_len 128: each held-out pass stays seconds on CPU
MAX_PROBLEMS = 8  # a broken file reports this many rows at once, not thousands
IGNORE = -100  # the label torch's cross-entropy skips
_HUB_NAME = re.compile(r"^(hf:|hub:)|^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class DataSource:
    """Where the rows live and their content hash (what the adapter key records)."""

    name: str  # as the spec gave it
    files: tuple[Path, ...]
    hash: str
    builtin: bool


@dataclass(frozen=True)
class Row:
    fmt: str
    split: str | None
    data: dict
    where: str  # file:line, for errors


def resolve(train_data: str, where: str = "train_data") -> DataSource:
    """The files behind `train_data` (a built-in name, a .jsonl file or a folder of them)."""
    if train_data in BUILTIN:
        from qeval.data.suite_data import ensure_built, suite_data_dir

        ensure_built()
        path = suite_data_dir() / BUILTIN[train_data]
        return DataSource(train_data, (path,), sha256_file(path), True)
    path = Path(train_data).expanduser()
    if path.is_file():
        files = (path,)
    elif path.is_dir():
        files = tuple(sorted(path.glob("*.jsonl")))
        if not files:
            raise QevalError(where, train_data, "a folder holding .jsonl files", "put the data in *.jsonl files")
    elif _HUB_NAME.search(train_data):
        raise QevalError(where, train_data, "a local JSONL file or folder (qeval does not download hub datasets: "
                         "this machine is offline)", "export it where there is network, e.g. datasets."
                         "load_dataset(name, split=...).to_json('train.jsonl'), map its fields to text, "
                         "prompt/completion or messages, and pass that file's path")
    else:
        raise unknown_name(where, train_data, BUILTIN, "or give the path of a .jsonl file or folder")
    digest = content_key({f.name: sha256_file(f) for f in files}) if path.is_dir() else sha256_file(path)
    return DataSource(train_data, files, digest, False)


def read_rows(src: DataSource) -> list[Row]:
    """Parse and validate every row; every problem found (up to MAX_PROBLEMS) in one error."""
    rows: list[Row] = []
    problems: list[QevalError] = []
    for path in src.files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            problems.append(QevalError(f"training data {path.name}:{line}", raw[e.start:e.start + 4],
                                       "UTF-8 text", "re-encode the file, e.g. iconv -f latin1 -t utf-8"))
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if len(problems) >= MAX_PROBLEMS:
                break
            if not line.strip():
                continue
            where = f"training data {path.name}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(QevalError(where, line[:60], f"one JSON object per line ({e.msg})", "fix the line"))
                continue
            try:
                rows.append(_row(obj, where))
            except QevalError as e:
                problems.append(e)
    if not problems and not rows:
        problems.append(QevalError("training data", src.name, "at least one JSON row", "the file is empty"))
    fmts = sorted({r.fmt for r in rows})
    if not problems and len(fmts) > 1:
        first = {f: next(r.where for r in rows if r.fmt == f) for f in fmts}
        problems.append(QevalError("training data", src.name, "one row format per source",
                                   "found " + ", ".join(f"{f} ({w})" for f, w in first.items()) + "; split them"))
    splits = {r.split for r in rows}
    if not problems and None in splits and len(splits) > 1:
        problems.append(QevalError("training data", src.name, "a 'split' field on every row or on none",
                                   "add split: train | heldout to every row, or remove it"))
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise QevalErrors(problems)
    return rows


def _row(obj: Any, where: str) -> Row:
    if not isinstance(obj, dict):
        raise QevalError(where, type(obj).__name__, "a JSON object")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise QevalError(f"{where} split", split, "train or heldout")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise QevalError(f"{where} messages", msgs, "a non-empty list of {role, content} objects")
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise QevalError(f"{where} message", m, f"{{role: {' | '.join(ROLES)}, content: string}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise QevalError(f"{where} messages", [m["role"] for m in msgs], "at least one assistant turn",
                             "the loss is on assistant turns only: a chat without one teaches nothing")
        return Row("chat", split, obj, where)
    if "prompt" in obj or "completion" in obj:
        for k in ("prompt", "completion"):
            if not isinstance(obj.get(k), str):
                raise QevalError(f"{where} {k}", obj.get(k, "missing"), "a string (prompt and completion both)")
        if not obj["completion"]:
            raise QevalError(f"{where} completion", "", "a non-empty string (the loss is on the completion)")
        return Row("prompt_completion", split, obj, where)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise QevalError(f"{where} text", obj["text"], "a non-empty string")
        return Row("text", split, obj, where)
    raise QevalError(f"{where} fields", sorted(obj), "a 'text' field, 'prompt' + 'completion', or 'messages'",
                     "rename the fields to one of these formats")


def split_rows(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """(train, heldout): the rows' own split fields, else the HELDOUT_FRACTION lowest content hashes."""
    if rows[0].split is not None:
        train = [r for r in rows if r.split == "train"]
        held = [r for r in rows if r.split == "heldout"]
    else:
        if len(rows) < 2:
            raise QevalError("training data", f"{len(rows)} row", "at least 2 rows (one is held out for the "
                             "loss curve)", "add rows")
        k = max(1, round(HELDOUT_FRACTION * len(rows)))
        ranked = sorted(range(len(rows)), key=lambda i: (content_key(rows[i].data), i))
        held_idx = set(ranked[:k])
        train = [r for i, r in enumerate(rows) if i not in held_idx]
        held = [r for i, r in enumerate(rows) if i in held_idx]
    if not train or not held:
        raise QevalError("training data split", f"{len(train)} train / {len(held)} heldout rows",
                         "at least one row of each", "mark some rows split: heldout (or train)")
    return train, held


def encode(row: Row, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE where the loss does not look) of one row, ending in EOS."""
    eos = tokenizer.eos_token_id
    if row.fmt == "text":
        ids = tokenizer(row.data["text"], add_special_tokens=False).input_ids + [eos]
        return ids, list(ids)
    if row.fmt == "prompt_completion":
        p = tokenizer(row.data["prompt"], add_special_tokens=False).input_ids
        c = tokenizer(row.data["completion"], add_special_tokens=False).input_ids + [eos]
        return p + c, [IGNORE] * len(p) + c
    return _encode_chat(row, tokenizer)


def _encode_chat(row: Row, tokenizer) -> tuple[list[int], list[int]]:
    """Render with the model's chat template; the loss covers the text each assistant turn adds.

    An assistant turn's span is found on the rendered text (the conversation up to it with the
    generation prompt, to the conversation including it), then mapped to tokens by their character
    offsets: this works for any template whose renderings of a conversation's prefixes are prefixes
    of its full rendering (all common ones), and says so when a template is not."""
    if not getattr(tokenizer, "chat_template", None):
        raise QevalError("training data", row.where, "a model whose tokenizer has a chat template",
                         "use text or prompt/completion rows for this model")
    msgs = row.data["messages"]
    render = lambda m, gen: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
    full = render(msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = render(msgs[:i], True) if i else "", render(msgs[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise QevalError("chat template", row.where, "a template that renders a conversation's turns as "
                             "prefixes of the whole (needed to find the assistant turns)",
                             "use prompt/completion rows instead")
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE for t, (s, _) in zip(ids, enc.offset_mapping)]
    if not full.rstrip().endswith(tokenizer.eos_token or "\0"):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if msgs[-1]["role"] == "assistant" else IGNORE)
    return ids, labels


@dataclass(frozen=True)
class Blocks:
    """Training or held-out blocks: ids and labels, shape (n, seq_len)."""

    ids: Any  # torch.LongTensor
    labels: Any
    rows: int
    long_rows: int  # rows longer than seq_len (packed across blocks, or truncated)
    loss_tokens: int  # labels the loss looks at


def make_blocks(rows: list[Row], tokenizer, seq_len: int, packing: str) -> Blocks:
    """Pack (EOS-joined, cut into seq_len blocks, the last partial block dropped) or truncate
    (one row per block, right-padded with the loss masked)."""
    import torch

    encoded = [encode(r, tokenizer) for r in rows]
    long_rows = sum(len(ids) > seq_len for ids, _ in encoded)
    if packing == "pack":
        ids = [t for x, _ in encoded for t in x]
        labels = [t for _, y in encoded for t in y]
        n = len(ids) // seq_len
        ids_t = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
        lab_t = torch.tensor(labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    else:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids_t = torch.full((len(encoded), seq_len), pad, dtype=torch.long)
        lab_t = torch.full((len(encoded), seq_len), IGNORE, dtype=torch.long)
        for i, (x, y) in enumerate(encoded):
            x, y = x[:seq_len], y[:seq_len]
            ids_t[i, : len(x)] = torch.tensor(x)
            lab_t[i, : len(y)] = torch.tensor(y)
        keep = (lab_t != IGNORE).any(dim=1)  # a row whose completion was cut off entirely teaches nothing
        ids_t, lab_t = ids_t[keep], lab_t[keep]
    return Blocks(ids_t, lab_t, len(rows), long_rows, int((lab_t != IGNORE).sum()))


def prepare(train_data: str, tokenizer, seq_len: int, packing: str) -> tuple[Blocks, Blocks, dict]:
    """(train blocks, held-out blocks, summary) for a spec's data; errors name the fix."""
    src = resolve(train_data)
    rows = read_rows(src)
    train_rows, held_rows = split_rows(rows)
    train = make_blocks(train_rows, tokenizer, seq_len, packing)
    held = make_blocks(held_rows, tokenizer, seq_len, packing)
    if len(train.ids) == 0 or len(held.ids) == 0:
        raise QevalError("seq_len", seq_len, f"shorter than the training data ({'train' if len(train.ids) == 0 else 'held-out'} "
                         "split gives no full block)", "lower seq_len, add rows, or use packing: truncate")
    held = Blocks(held.ids[:MAX_HELDOUT_BLOCKS], held.labels[:MAX_HELDOUT_BLOCKS], held.rows, held.long_rows,
                  int((held.labels[:MAX_HELDOUT_BLOCKS] != IGNORE).sum()))
    summary = {"source": train_data, "format": rows[0].fmt, "hash": src.hash, "packing": packing,
               "train_rows": train.rows, "heldout_rows": held.rows, "train_blocks": len(train.ids),
               "heldout_blocks": len(held.ids), "long_rows": train.long_rows + held.long_rows,
               "train_loss_tokens": train.loss_tokens}
    return train, held, summary
