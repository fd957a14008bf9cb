"""Shared fixtures. Tests run offline: an accidental hub download fails loudly instead of hanging.

Isolation: before anything is imported or any fixture (of any scope) runs, QEVAL_CACHE, the suite
data, QEVAL_HOME and QEVAL_STORE point into a fresh temporary folder, so no test reads or writes the
user's ~/.cache/qeval or ./results, and module-scoped fixtures (the truth tests' stores) compare only
with what they computed themselves. The one thing shared read-only with the user's cache is the
converted embedded model (40 s to convert): it is linked into the session cache.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_flag] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_USER_CACHE = Path(os.environ.get("QEVAL_CACHE") or Path.home() / ".cache" / "qeval").expanduser()
SESSION_ROOT = Path(tempfile.mkdtemp(prefix="qeval-tests-"))
SESSION_CACHE = SESSION_ROOT / "cache"
os.environ["QEVAL_CACHE"] = str(SESSION_CACHE)
_CARRIED_DATA = Path(os.environ.get("QEVAL_SUITE_DATA", "")) / "MANIFEST.json"
os.environ["QEVAL_SUITE_DATA"] = str(SESSION_ROOT / "suite-data")  # one build per session, any test's cache
if _CARRIED_DATA.is_file():
    # copied, not used in place (tests stay isolated); a machine without gensim (the GPU image)
    # runs on suite data built elsewhere and carried (checked by content hash in build_all)
    shutil.copytree(_CARRIED_DATA.parent, SESSION_ROOT / "suite-data")
os.environ["QEVAL_HOME"] = str(SESSION_ROOT / "home")
os.environ.pop("QEVAL_STORE", None)
(SESSION_CACHE / "models").mkdir(parents=True)
for _model in (_USER_CACHE / "models").glob("*"):
    if _model.is_dir() and (_model / "config.json").is_file():
        (SESSION_CACHE / "models" / _model.name).symlink_to(_model, target_is_directory=True)

# llama.cpp's ggml library for the GGUF K-quants (`qeval setup --backend gguf-k`), used read-only from
# the user's cache (every test's private cache would lack it)
for _lib in sorted((_USER_CACHE / "ggml").glob("*/libggml-base.so")):
    os.environ.setdefault("QEVAL_GGML_LIB", str(_lib))
# ... and llama.cpp's runtime for the GGUF parity check (`qeval parity --setup`), the same way
for _rt in sorted((_USER_CACHE / "llama-cpp").glob("*/llama_cpp/lib/libllama.so")):
    os.environ.setdefault("QEVAL_LLAMA_CPP_DIR", str(_rt.parents[2]))

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from qeval.data.suite_data import ensure_built  # noqa: E402


TIERS = ("unit", "tiny", "real")
UNIT_FILE = "pytestmark = pytest.mark.unit"


def pytest_ignore_collect(collection_path, config):
    # `-m unit` must not even import the other test files: importing them imports torch
    if config.getoption("markexpr") == "unit" and collection_path.suffix == ".py" \
            and collection_path.name.startswith("test_"):
        return UNIT_FILE not in collection_path.read_text(encoding="utf-8")
    return None


def pytest_collection_modifyitems(config, items):
    """Every test gets exactly one tier: `real` (marked slow: the embedded model), `unit` (its file
    says `pytestmark = pytest.mark.unit`: no torch, no transformers) or `tiny` (everything else: the
    tiny model built from a config). `make test-unit` is `-m unit`, checked torch-free at the end."""
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(pytest.mark.real)
        elif "unit" not in item.keywords:
            item.add_marker(pytest.mark.tiny)
    if not any("gpu" in item.keywords for item in items):
        return  # no torch import for a selection without GPU tests (the unit tier stays torch-free)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _lee_background() -> list[str]:
    spec = importlib.util.find_spec("gensim")
    if spec is None:  # the GPU image: the carried suite data holds the same corpus's training split
        rows = (Path(os.environ["QEVAL_SUITE_DATA"]) / "lee_train.jsonl").read_text().splitlines()
        return [json.loads(r)["text"] for r in rows]
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee_background.cor"
    return [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def build_tiny_model(folder: Path, tie_embeddings: bool = False, seed: int = 0, init_range: float = 0.02,
                     **sizes) -> Path:
    """A 2-layer Llama (hidden 64; `sizes` override the config's widths) with a BPE tokenizer trained
    here on real news text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_lee_background(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    torch.manual_seed(seed)
    widths = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              **sizes}
    cfg = LlamaConfig(vocab_size=fast.vocab_size, num_hidden_layers=2, max_position_embeddings=1024,
                      tie_word_embeddings=tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=init_range, **widths)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_trained_tiny_model(folder: Path, steps: int = 60, init_range: float = 0.2) -> Path:
    """`build_tiny_model`, then `steps` AdamW steps (8 x 64 tokens, lr 1e-2; ~10 s on CPU) on the Lee
    background news: a weak language model (loss ~6.3 -> ~5.3 nats) whose losses under quantization
    are systematic, not the coin flips of random weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_model(folder, init_range=init_range)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor(tok("\n".join(_lee_background()))["input_ids"])
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=gen)
        x = torch.stack([ids[s:s + 64] for s in starts])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def resolved(tiny_model_dir):
    """The tiny model resolved as qeval resolves a user's folder (shared by the format tests)."""
    from qeval.models.load import resolve_model

    return resolve_model(str(tiny_model_dir))


TINY_STORE_SUITE = """name: tiny-store
tasks:
  - {task: qeval_analogy, limit: 24, batch_size: 8}
  - {task: qeval_lee_ppl, limit: 12, divergence: true}
"""
TINY_STORE_ADAPTERS = {
    name: {"train_quant": quant, "steps": 3, "batch_size": 2, "seq_len": 32, "eval_every": 1,
           "domain_tasks": ["qeval_lee_ppl"]}
    for name, quant in (("lora", "none"), ("qlora", "bnb-nf4"))}
TINY_STORE_ARMS = ({"name": "lora", "quant": "none", "adapter": "lora"},
                   {"name": "qlora", "quant": "bnb-nf4", "adapter": "qlora"})


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A store of one small plan on a briefly trained tiny model (so formats lose measurably): the
    baseline, NF4 and gguf:q8_0 (simulated compute), LoRA on the float base and QLoRA on NF4, on
    analogy (24 right/wrong documents) and Lee perplexity (12 documents, with KL). Read-only for the
    tests that share it: (store path, model folder)."""
    from qeval.run import jobs, runner
    from qeval.train.recipe import finetune as real

    tmp = tmp_path_factory.mktemp("tiny-store")
    model = build_trained_tiny_model(tmp / "model")
    (tmp / "suite.yaml").write_text(TINY_STORE_SUITE)
    plan = runner.plan_from(dict(models=(str(model),), suite=str(tmp / "suite.yaml"), device="cpu",
                                 formats=("none", "bnb-nf4", "gguf:q8_0"),
                                 adapters=TINY_STORE_ADAPTERS, arms=TINY_STORE_ARMS))
    with pytest.MonkeyPatch.context() as mp:  # train in this process: a fresh one costs seconds of imports
        mp.setattr(jobs, "finetune", lambda *a, **k: real(*a, **{**k, "isolate": False}))
        summary = runner.run_plan(plan, tmp / "store.sqlite", progress=lambda s: None)
    assert not summary.failed, summary.failed
    return tmp / "store.sqlite", model


@pytest.fixture(scope="session", autouse=True)
def suite_data():
    ensure_built()


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Fast tests also get a private cache per test (fingerprint memos, references, adapters). The
    integration tier shares the session cache, where the embedded model is linked in."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("QEVAL_CACHE", str(tmp_path / "cache"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)
    import sys

    items = getattr(session, "items", [])
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    if items and all("unit" in item.keywords for item in items) and heavy:
        # the unit tier's promise: it imports neither (so it runs in seconds, anywhere)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nunit tier imported {', '.join(heavy)}: a unit test (or what it imports) is not torch-free")
