"""One LoRA trainer: LoRA and QLoRA on the tiny model, reuse, merge paths, full fine-tune."""
import json

import pytest
import torch
from safetensors import safe_open

from qeval.train.artifact import load_finetuned
from qeval.train.merge import attach
from qeval.train.recipe import finetune
from qeval.train.spec import AdapterSpec, adapter_key
from qeval.core.errors import QevalError
from qeval.models.load import load_model, resolve_model
from qeval.quant.formats import FORMATS

TINY = dict(steps=4, batch_size=2, seq_len=64, eval_every=2, lr=1e-2)  # a large lr: visible change in 4 steps


@pytest.fixture
def resolved(tiny_model_dir):
    return resolve_model(str(tiny_model_dir))


@pytest.fixture
def ids(resolved):
    tok = load_model(resolved, FORMATS.get("none"), "cpu").tokenizer
    return tok("Firefighters battled the blaze near Sydney overnight.", return_tensors="pt").input_ids


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_lora_trains_only_lora_tensors_and_saves_only_them(resolved):
    art = finetune(resolved, AdapterSpec(**TINY), "cpu")  # in its own process, as `qeval run` does
    assert not art.reused and art.path.is_dir()
    with safe_open(str(art.path / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)
    # all linear layers of the blocks: 2 layers x 7 projections x (A, B)
    assert len(names) == 2 * 7 * 2
    # r x (in + out) per projection; tiny model: hidden 64, kv width 32 (2 of 4 heads), mlp 128
    r, h, kv, mlp = 16, 64, 32, 128
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + mlp) + (mlp + h))
    assert art.trainable_params == 2 * per_layer
    assert len(art.losses) == 4 and [s for s, _ in art.heldout] == [0, 2, 4]
    assert art.peak_train_bytes > art.idle_bytes > 0 and art.s_per_step > 0 and art.tokens_per_s > 0
    assert art.adapter_bytes == (art.path / "adapter_model.safetensors").stat().st_size
    meta = json.loads((art.path / "qeval-artifact.json").read_text())
    assert meta["spec"]["train_quant"] == "none" and meta["key"] == art.key


def test_qlora_base_is_really_4bit_during_training(resolved, monkeypatch):
    import qeval.train.recipe as recipe

    seen = {}
    real = recipe.trainable

    def spy(model, spec, ckpt=True):
        net = real(model, spec, ckpt)
        census = {}
        for n, p in net.named_parameters():
            census.setdefault(f"{type(p).__name__}:{p.dtype}:{p.requires_grad}", []).append(n)
        seen.update(census)
        return net

    monkeypatch.setattr(recipe, "trainable", spy)
    art = finetune(resolved, AdapterSpec(train_quant="bnb-nf4-dq", **TINY), "cpu", isolate=False)
    frozen_4bit = seen.get("Params4bit:torch.uint8:False", [])
    assert len(frozen_4bit) == 14  # every projection stays packed 4-bit and frozen
    trainable = [n for k, names in seen.items() if k.endswith(":True") for n in names]
    assert trainable and all("lora_" in n for n in trainable)
    # nothing non-LoRA was upcast or unfrozen: embeddings and norms stay frozen float32
    assert all("lora_" not in n for n in seen.get("Parameter:torch.float32:False", []))
    assert art.spec.train_quant == "bnb-nf4-dq"


def test_second_finetune_reuses_the_artifact(resolved, monkeypatch):
    spec = AdapterSpec(**TINY)
    first = finetune(resolved, spec, "cpu", isolate=False)
    import qeval.train.recipe as recipe

    monkeypatch.setattr(recipe, "load_model", lambda *a, **k: pytest.fail("retrained instead of reusing"))
    again = finetune(resolved, spec, "cpu")
    assert again.reused and again.key == first.key and again.losses == first.losses
    other = adapter_key(resolved, AdapterSpec(**{**TINY, "r": 8}), "cpu")
    assert other != first.key  # a different recipe is a different adapter


def test_merge_paths(resolved, ids):
    art = finetune(resolved, AdapterSpec(train_quant="bnb-nf4-dq", **TINY), "cpu", isolate=False)
    quantized = _logits(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu").model, ids)
    unmerged_lm = attach(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu"), art)
    unmerged = _logits(unmerged_lm.model, ids)
    assert (unmerged - quantized).abs().max() > 1e-4  # the adapter changes the model
    merged_lm = attach(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu"), art, merge="dequantized")
    merged = _logits(merged_lm.model, ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)  # exact up to float rounding
    assert merged_lm.fmt.name == "none" and merged_lm.footprint.quantized_params == 0
    assert not any("lora_" in n for n, _ in merged_lm.model.named_parameters())
    requant_lm = attach(load_model(resolved, FORMATS.get("bnb-nf4-dq"), "cpu"), art, merge="requantized")
    assert requant_lm.fmt.name == "bnb-nf4-dq"
    assert {type(p).__name__ for n, p in requant_lm.model.named_parameters() if "proj" in n} == {"Params4bit"}
    requant = _logits(requant_lm.model, ids)
    assert (requant - merged).abs().max() > 1e-4  # re-quantizing the merged weights is lossy


def test_full_finetune_reference_arm(resolved, ids):
    art = finetune(resolved, AdapterSpec(method="full", **{**TINY, "lr": 1e-3}), "cpu", isolate=False)
    assert art.trainable_params == art.total_params
    ft = load_finetuned(resolved, art, "none", "cpu")
    base = load_model(resolved, FORMATS.get("none"), "cpu")
    assert (_logits(ft.model, ids) - _logits(base.model, ids)).abs().max() > 1e-4
    assert ft.resolved.fingerprint == resolved.fingerprint  # results stay keyed to the base model


def test_impossible_combinations_are_one_line_errors():
    probs = AdapterSpec(method="full", train_quant="bnb-nf4").problems("adapters.x")
    assert len(probs) == 1 and "train_quant" in str(probs[0]) and "lora" in str(probs[0])
    probs = AdapterSpec(method="dora", train_quant="bnb-nf5", steps=0).problems("adapters.y")
    text = "\n".join(map(str, probs))
    assert "did you mean 'bnb-nf4'" in text and "'dora'" in text and "steps" in text
    assert all(isinstance(p, QevalError) for p in probs)


# ----------------------------------------------------------------------------- user training data
from pathlib import Path  # noqa: E402

from qeval.data import train_data as td # noqa: E402
from qeval.train.spec import not_converged  # noqa: E402
from qeval.core.errors import QevalErrors  # noqa: E402
from qeval.data.suite_data import suite_data_dir  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def tok(resolved):
    t = load_model(resolved, FORMATS.get("none"), "cpu").tokenizer
    t.chat_template = CHATML  # the tiny tokenizer has none; the template is SmolLM2's, minus its system line
    return t


def _example(name: str, n: int | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (suite_data_dir() / td.BUILTIN[name]).read_text().splitlines()]
    return rows[:n] if n else rows


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_prompt_completion_loss_is_on_the_completion_only(tok):
    row = _example("example-prompt-completion", 1)[0]
    ids, labels = td.encode(td._row(row, "x"), tok)
    completion = tok(row["completion"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    kept = [t for t in labels if t != td.IGNORE]
    assert kept == completion and ids[-len(completion):] == completion  # independent tokenization
    assert labels[: len(ids) - len(completion)] == [td.IGNORE] * (len(ids) - len(completion))


def test_chat_loss_is_on_assistant_turns_only(tok):
    row = next(r for r in _example("example-chat") if len(r["messages"]) == 4)
    ids, labels = td.encode(td._row(row, "x"), tok)
    kept = tok.decode([t for t in labels if t != td.IGNORE])
    assistant = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    user = [m["content"] for m in row["messages"] if m["role"] == "user"]
    # the loss text is exactly each assistant turn with its end marker (and the final EOS)
    assert kept == "".join(a + "<|im_end|>\n" for a in assistant) + tok.eos_token
    assert all(u not in kept for u in user) and tok.decode(ids).startswith("<|im_start|>user\n" + user[0])


def test_chat_needs_a_chat_template(resolved):
    plain = load_model(resolved, FORMATS.get("none"), "cpu").tokenizer
    with pytest.raises(QevalError, match="chat template"):
        td.encode(td._row(_example("example-chat", 1)[0], "x"), plain)


def test_every_format_trains_end_to_end(tiny_model_dir, tmp_path):
    """A user's JSONL file in each format, through the same finetune a plan runs."""
    import shutil

    from transformers import AutoTokenizer

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "chat-model"))  # the shared tiny model stays as is
    t = AutoTokenizer.from_pretrained(folder)
    t.chat_template = CHATML
    t.save_pretrained(folder)  # this copy has a chat template, like SmolLM2
    resolved = resolve_model(str(folder))
    seen = {}
    for name in ("example-text", "example-prompt-completion", "example-chat"):
        path = _jsonl(tmp_path / f"{name}.jsonl", _example(name, 40))
        art = finetune(resolved, AdapterSpec(train_data=str(path), **TINY), "cpu", isolate=False)
        seen[art.data["format"]] = art
        assert art.data["hash"] == td.resolve(str(path)).hash and art.steps_done == 4
        assert art.tokens == 4 * TINY["batch_size"] * TINY["seq_len"]
        assert art.data["train_rows"] + art.data["heldout_rows"] == 40 and art.data["heldout_rows"] == 4
    assert set(seen) == set(td.DATA_FORMATS)
    assert len({a.key for a in seen.values()}) == 3


def test_lora_and_qlora_see_the_same_tokens_in_the_same_order(resolved):
    lora = finetune(resolved, AdapterSpec(**TINY), "cpu", isolate=False)
    qlora = finetune(resolved, AdapterSpec(train_quant="bnb-nf4-dq", **TINY), "cpu", isolate=False)
    assert lora.order_hash == qlora.order_hash and lora.tokens == qlora.tokens
    other = finetune(resolved, AdapterSpec(**{**TINY, "seed": 7}), "cpu", isolate=False)
    assert other.order_hash != lora.order_hash  # the hash does see the order


def test_data_hash_is_in_the_key_not_the_path(resolved, tmp_path):
    rows = _example("example-text", 20)
    a = _jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "moved").mkdir()
    b = _jsonl(tmp_path / "moved" / "b.jsonl", rows)
    c = _jsonl(tmp_path / "c.jsonl", rows[:-1] + [{"text": rows[-1]["text"][:-1]}])
    key = lambda p: adapter_key(resolved, AdapterSpec(train_data=str(p)), "cpu")
    assert key(a) == key(b) != key(c)
    # domain_tasks says how results are read, not what is trained: same adapter
    assert adapter_key(resolved, AdapterSpec(domain_tasks=("x",)), "cpu") == adapter_key(resolved, AdapterSpec(), "cpu")


def test_heldout_split_is_deterministic_and_order_free():
    rows = [td._row(r, "x") for r in _example("example-text")]
    train, held = td.split_rows(rows)
    assert len(held) == round(td.HELDOUT_FRACTION * len(rows)) and len(train) + len(held) == len(rows)
    _, again = td.split_rows(list(reversed(rows)))
    assert {json.dumps(r.data) for r in held} == {json.dumps(r.data) for r in again}
    fixed = [td._row(r, "x") for r in _example("lee_background")]  # rows that carry their own split
    assert len(td.split_rows(fixed)[1]) == 30


def test_long_rows_pack_or_truncate(tok):
    rows = [td._row(r, "x") for r in _example("example-prompt-completion", 30)]
    encoded = [td.encode(r, tok) for r in rows]
    longer = sum(len(i) > 64 for i, _ in encoded)
    packed = td.make_blocks(rows, tok, 64, "pack")
    assert packed.long_rows == longer > 0 and len(packed.ids) == sum(len(i) for i, _ in encoded) // 64
    cut = td.make_blocks(rows, tok, 64, "truncate")
    assert cut.long_rows == longer and cut.ids.shape[1] == 64
    # truncated rows keep their first 64 tokens; padding and prompts are out of the loss
    assert cut.loss_tokens == sum(sum(t != td.IGNORE for t in lab[:64]) for _, lab in encoded if any(
        t != td.IGNORE for t in lab[:64]))


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (b'{"txt": "a"}\n', "'text' field"),
    (b'{"prompt": "a"}\n', "completion"),
    (b'{"text": "caf\xe9"}\n', "UTF-8"),
    (b'{"text": "a"\n', "one JSON object per line"),
    (b'{"messages": [{"role": "user", "content": "a"}]}\n', "assistant turn"),
    (b'{"text": "a"}\n{"prompt": "a", "completion": "b"}\n', "one row format per source"),
    (b'{"text": "a", "split": "test"}\n', "train or heldout"),
])
def test_bad_training_data_is_one_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(QevalError, match=match):
        td.read_rows(td.resolve(str(path)))
    probs = AdapterSpec(train_data=str(path)).problems("adapters.a")  # a plan reports it before loading
    assert any(match in str(p) for p in probs)


def test_several_bad_rows_are_reported_together(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"txt": 1}\n{"text": "ok"}\n{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(QevalErrors) as e:
        td.read_rows(td.resolve(str(path)))
    assert [x.what for x in e.value.errors] == ["training data bad.jsonl:1 fields",
                                                "training data bad.jsonl:3 completion"]


def test_hub_names_and_unknown_names():
    with pytest.raises(QevalError, match="offline") as e:
        td.resolve("HuggingFaceH4/ultrachat_200k")
    assert "to_json" in str(e.value)
    with pytest.raises(QevalError, match="did you mean 'example-chat'"):
        td.resolve("example_chat")


def test_budget_in_tokens_and_early_stopping(resolved, monkeypatch):
    spec = AdapterSpec(**{**TINY, "steps": 99, "budget_tokens": 1000})
    assert spec.train_steps == 8  # ceil(1000 / (2 x 64))
    import qeval.train.recipe as recipe

    rising = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])  # best at the first evaluation, then worse
    monkeypatch.setattr(recipe, "heldout_loss_of", lambda *a: next(rising))
    art = finetune(resolved, AdapterSpec(**{**TINY, "steps": 10, "early_stopping_patience": 2}), "cpu", isolate=False)
    assert art.steps_done == 6 and art.tokens == 6 * 2 * 64 and [s for s, _ in art.heldout] == [0, 2, 4, 6]


def test_not_converged_note():
    assert not_converged([(0, 3.0), (5, 2.5), (10, 2.0), (15, 1.8), (20, 1.7)])  # still falling 15%
    assert not not_converged([(0, 3.0), (5, 2.0), (10, 1.999), (15, 2.0), (20, 1.998)])


def test_peft_passthrough_is_checked_against_loraconfig(resolved):
    text = "\n".join(map(str, AdapterSpec(peft={"use_dorra": True, "lora_alpha": 8}).problems("adapters.a")))
    assert "did you mean 'use_dora'" in text and "'alpha'" in text
    text = "\n".join(map(str, AdapterSpec(peft={"init_lora_weights": "pisa"}).problems("adapters.a")))
    assert "did you mean 'pissa'" in text
    assert AdapterSpec(peft={"init_lora_weights": "pissa_niter_4", "use_rslora": True}).problems("a") == []
    assert "loftq_config" in str(AdapterSpec(peft={"init_lora_weights": "loftq"}).problems("a"))
    art = finetune(resolved, AdapterSpec(peft={"use_dora": True, "rank_pattern": {"q_proj": 4}}, **TINY), "cpu",
                   isolate=False)
    with safe_open(str(art.path / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
        q = f.get_tensor(next(n for n in names if "q_proj.lora_A" in n))
    assert any("lora_magnitude_vector" in n for n in names) and q.shape[0] == 4  # DoRA, per-module rank


def test_seeds_expand_into_one_adapter_and_arm_per_seed():
    from qeval.run.plan import plan_from, validate

    plan = plan_from(dict(models=("m",), formats=("none",), adapters={"lora": {"seeds": [3, 5], "domain_tasks": ["qeval_lee_ppl"]}},
                          arms=({"name": "l", "quant": "none", "adapter": "lora"},)))
    rp = validate(plan)
    assert [a.name for a in rp.arms] == ["none", "l#s3", "l#s5"]
    assert {k: v.seed for k, v in rp.adapters.items()} == {"lora#s3": 3, "lora#s5": 5}
    assert all(v.seeds == () for v in rp.adapters.values())
    assert "distinct" in str(AdapterSpec(seeds=(1, 1)).problems("a"))


def test_shipped_adapter_plan_is_valid():
    from pathlib import Path

    from qeval.run.runner import load_plan, validate

    rp = validate(load_plan(Path(__file__).parents[1] / "plans" / "adapters.yaml"))
    specs = rp.adapters
    assert len(specs) == 6 and {s.train_data for s in specs.values()} == {"example-chat"}
    assert len({(s.budget_tokens, s.seq_len, s.batch_size, s.packing) for s in specs.values()}) == 1  # one budget
    assert specs["qdora#s1"].peft == {"use_dora": True} and specs["qdora#s2"].seed == 2


def test_loftq_on_cpu_is_one_clear_error(resolved):
    spec = AdapterSpec(peft={"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, **TINY)
    assert spec.problems("a") == []  # a valid recipe ...
    with pytest.raises(QevalError, match="CUDA device"):  # ... that peft can only compute on a GPU
        finetune(resolved, spec, "cpu", isolate=False)


def test_time_per_step_excludes_the_heldout_passes(resolved, monkeypatch):
    import time as _time

    import qeval.train.recipe as recipe

    def slow(*a):
        _time.sleep(0.4)
        return 1.0

    monkeypatch.setattr(recipe, "heldout_loss_of", slow)
    t = _time.perf_counter()
    art = finetune(resolved, AdapterSpec(**{**TINY, "steps": 2, "eval_every": 1}), "cpu", isolate=False)
    wall = _time.perf_counter() - t
    assert art.eval_s >= 3 * 0.4  # before training, after step 1 and step 2
    assert art.train_s < wall - 3 * 0.4 and art.s_per_step == pytest.approx(art.train_s / 2)


def test_default_plan_and_the_full_ft_plan_share_the_lora_recipe():
    """plans/full-ft.yaml says `lora` is reused from a `make report` cache: the recipes must be equal."""
    from pathlib import Path

    from qeval.run.runner import load_plan, validate

    plans = Path(__file__).parents[1] / "plans"
    default, full = (validate(load_plan(plans / f"{n}.yaml")) for n in ("default", "full-ft"))
    assert default.adapters["lora"] == full.adapters["lora"]
    assert full.adapters["full"].method == "full" and "full" not in default.adapters
    formats = load_plan(plans / "default.yaml").formats  # the bar: >= 14 formats, >= 4 backends
    assert len(formats) - 1 >= 14 and len({FORMATS.get(f).backend for f in formats} - {"none"}) >= 4


def test_checkpointing_setting_keys_the_adapter_but_not_its_weights(resolved, tmp_path, monkeypatch):
    """Non-reentrant checkpointing recomputes each block with its first run's RNG state: off, on or
    auto, the same adapter bit for bit, under its own key (the memory differs); true keeps today's key."""
    monkeypatch.setenv("QEVAL_CACHE", str(tmp_path))
    arts = {ck: finetune(resolved, AdapterSpec(gradient_checkpointing=ck, **TINY), "cpu", isolate=False)
            for ck in (True, False, "auto")}
    weights = {ck: (a.path / "adapter_model.safetensors").read_bytes() for ck, a in arts.items()}
    assert weights[True] == weights[False] == weights["auto"]
    assert len({a.key for a in arts.values()}) == 3
    assert arts[False].memory["options"].startswith("checkpointing none")
    assert arts["auto"].memory["options"].startswith("checkpointing none (auto)")  # a tiny model needs no checkpointing


def test_checkpointing_accepts_true_false_auto_only():
    assert any("gradient_checkpointing" in str(e) for e in AdapterSpec(gradient_checkpointing="sometimes").problems("a"))
    assert not [e for e in AdapterSpec(gradient_checkpointing="auto").problems("a") if "checkpointing" in str(e)]
