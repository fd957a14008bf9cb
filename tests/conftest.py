"""Shared fixtures. Tests run offline: an accidental hub download fails loudly instead of hanging."""
import os

for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_flag] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from qeval.suite_data import ensure_built  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _lee_background() -> list[str]:
    spec = importlib.util.find_spec("gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "lee_background.cor"
    return [line for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def build_tiny_model(folder: Path, tie_embeddings: bool = False, seed: int = 0, init_range: float = 0.02) -> Path:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer trained here on real news text."""
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
    cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      initializer_range=init_range)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session", autouse=True)
def suite_data():
    ensure_built()


@pytest.fixture(autouse=True)
def isolated_cache(request, tmp_path, monkeypatch):
    """Fast tests get a private cache (fingerprint memos, conversions). The integration tier keeps
    the user's cache, where `make test`'s setup step already converted the embedded model once."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("QEVAL_CACHE", str(tmp_path / "cache"))
