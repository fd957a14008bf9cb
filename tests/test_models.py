"""Stage 1 (qeval/models.py): resolving model specs, fingerprints, GGUF caching, loading on CPU."""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import qeval.models.load as models
from qeval.core import env
from qeval.core.errors import QevalError
from qeval.models.load import fingerprint, load_model, resolve_model
from qeval.quant.formats import FORMATS

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _scale_one_weight(folder: Path, factor: float = 2.0) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(n for n in tensors if n.endswith("q_proj.weight"))[0]
    tensors[name] = (tensors[name] * factor).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


# --- resolving a folder, fingerprints -----------------------------------------------------------

def test_resolve_folder_gives_stable_hex_fingerprint(tiny_model_dir):
    r1 = resolve_model(str(tiny_model_dir))
    r2 = resolve_model(str(tiny_model_dir))
    assert r1.source == "folder"
    assert r1.spec == str(tiny_model_dir)
    assert r1.path == tiny_model_dir.resolve()
    assert HEX64.match(r1.fingerprint), r1.fingerprint
    assert r2.fingerprint == r1.fingerprint


def test_fingerprint_is_content_based_and_changes_with_weights(tiny_model_dir, tmp_path):
    original = resolve_model(str(tiny_model_dir)).fingerprint
    copy = _copy(tiny_model_dir, tmp_path / "copy")
    # Same bytes in another folder: same fingerprint (content, not path).
    assert resolve_model(str(copy)).fingerprint == original

    _scale_one_weight(copy)
    changed = resolve_model(str(copy)).fingerprint
    assert HEX64.match(changed)
    assert changed != original
    # ... and the original folder is untouched.
    assert resolve_model(str(tiny_model_dir)).fingerprint == original


def test_fingerprint_changes_with_config(tiny_model_dir, tmp_path):
    original = resolve_model(str(tiny_model_dir)).fingerprint
    copy = _copy(tiny_model_dir, tmp_path / "copy")
    cfg = json.loads((copy / "config.json").read_text())
    cfg["rms_norm_eps"] = cfg.get("rms_norm_eps", 1e-6) * 10
    (copy / "config.json").write_text(json.dumps(cfg))
    assert resolve_model(str(copy)).fingerprint != original


def test_fingerprint_memo_skips_rehash(tiny_model_dir, tmp_path, monkeypatch):
    first = resolve_model(str(tiny_model_dir)).fingerprint

    calls = []

    def no_hashing(path):
        calls.append(path)
        raise AssertionError(f"re-hashed {path}")

    import qeval.core.files as files

    monkeypatch.setattr(files, "sha256_file", no_hashing)  # the one hash helper, where fingerprint lives
    assert resolve_model(str(tiny_model_dir)).fingerprint == first
    assert calls == []

    # The memo lives in QEVAL_CACHE: with an empty cache the hash really is recomputed.
    monkeypatch.setenv("QEVAL_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(AssertionError, match="re-hashed"):
        resolve_model(str(tiny_model_dir))


def test_fingerprint_memo_invalidated_by_mtime(tiny_model_dir, tmp_path, monkeypatch):
    copy = _copy(tiny_model_dir, tmp_path / "copy")
    first = fingerprint(copy)
    hashed = []
    import qeval.core.files as files

    real = files.sha256_file

    def counting(path):
        hashed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(files, "sha256_file", counting)  # the one hash helper, where fingerprint lives
    weights = copy / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert fingerprint(copy) == first  # same bytes, same fingerprint ...
    assert "model.safetensors" in hashed  # ... but recomputed, since the file's stat changed


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["/no/such/dir", "./nope"])
def test_missing_path(spec):
    with pytest.raises(QevalError) as ei:
        resolve_model(spec)
    msg = str(ei.value)
    assert "model path" in msg and repr(spec) in msg
    assert "existing folder or .gguf file" in msg
    assert "\n" not in msg


def test_folder_without_config(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(QevalError) as ei:
        resolve_model(str(folder))
    msg = str(ei.value)
    assert str(folder) in msg
    assert "config.json" in msg
    assert "\n" not in msg


def test_missing_gguf_file(tmp_path):
    spec = str(tmp_path / "missing.gguf")
    with pytest.raises(QevalError) as ei:
        resolve_model(spec)
    msg = str(ei.value)
    assert repr(spec) in msg
    assert "existing .gguf file" in msg


def test_hub_id_offline():
    assert env.is_offline()
    with pytest.raises(QevalError) as ei:
        resolve_model("org/model")
    msg = str(ei.value)
    assert "'org/model'" in msg
    assert "offline" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("repo_id", ["Qwen/Qwen2.5-0.5B", "microsoft/phi-1.5"])
def test_hub_id_with_dot_offline(repo_id):
    with pytest.raises(QevalError) as ei:
        resolve_model(repo_id)
    msg = str(ei.value)
    assert repr(repo_id) in msg
    assert "offline" in msg


def test_unknown_bare_word_lists_embedded():
    with pytest.raises(QevalError) as ei:
        resolve_model("smollm3")
    msg = str(ei.value)
    assert "'smollm3'" in msg
    assert "smollm2-135m" in msg
    assert "hub id" in msg


# --- loading --------------------------------------------------------------------------------------

def test_load_none_on_cpu(tiny_model_dir):
    lm = load_model(resolve_model(str(tiny_model_dir)), FORMATS.get("none"), "cpu")
    assert lm.dtype == "float32"
    assert lm.device == "cpu"
    assert lm.load_s > 0
    assert lm.peak_load_bytes > 0
    assert lm.tokenizer.pad_token is not None
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    expected = (sum(p.numel() * p.element_size() for p in lm.model.parameters())
                + sum(b.numel() * b.element_size() for b in lm.model.buffers()))
    fp = lm.footprint
    assert fp.total_bytes == expected
    assert fp.quantized_params == 0 and fp.quantized_weight_bytes == 0 and fp.quant_state_bytes == 0
    assert fp.unquantized_bytes == expected


def test_load_sets_pad_token_when_missing(tiny_model_dir, tmp_path):
    copy = _copy(tiny_model_dir, tmp_path / "nopad")
    tc = json.loads((copy / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(tc))
    tj = json.loads((copy / "tokenizer.json").read_text())
    tj["padding"] = None
    (copy / "tokenizer.json").write_text(json.dumps(tj))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(copy).pad_token is None  # precondition: really no pad token
    lm = load_model(resolve_model(str(copy)), FORMATS.get("none"), "cpu")
    assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "</s>"


def test_folder_without_weights_is_a_qeval_error(tiny_model_dir, tmp_path):
    copy = _copy(tiny_model_dir, tmp_path / "noweights")
    (copy / "model.safetensors").unlink()
    with pytest.raises(QevalError) as ei:  # caught when the folder is resolved: before any store opens
        resolve_model(str(copy))
    msg = str(ei.value)
    assert str(copy) in msg and "weight files" in msg
    assert "\n" not in msg


def test_corrupt_weights_are_a_qeval_error(tiny_model_dir, tmp_path):
    copy = _copy(tiny_model_dir, tmp_path / "corrupt")
    (copy / "model.safetensors").write_bytes(b"not a safetensors file " * 64)
    with pytest.raises(QevalError) as ei:
        resolve_model(str(copy))
    msg = str(ei.value)
    assert str(copy) in msg
    assert "a complete safetensors file" in msg


def test_missing_tokenizer_blames_the_tokenizer(tiny_model_dir, tmp_path):
    copy = _copy(tiny_model_dir, tmp_path / "notok")
    for f in copy.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(QevalError, match="tokenizer files") as ei:
        resolve_model(str(copy))
    assert "weights" not in str(ei.value)


def test_runtime_load_errors_are_not_blamed_on_the_weights(tiny_model_dir, monkeypatch):
    """An OOM (or any runtime failure) while loading propagates as itself: the runner records a
    failed cell instead of telling the user to delete a good cache."""
    import transformers

    resolved = resolve_model(str(tiny_model_dir))

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_model(resolved, FORMATS.get("none"), "cpu")


# --- GGUF conversion cache ------------------------------------------------------------------------

def _fake_convert(tiny: Path, calls: list):
    def convert(gguf: Path, target: Path) -> None:
        calls.append((Path(gguf), Path(target)))
        shutil.copytree(tiny, target)

    return convert


def test_gguf_converted_once_into_cache(tiny_model_dir, tmp_path, monkeypatch):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(tiny_model_dir, calls))

    r1 = resolve_model(str(gguf))
    assert len(calls) == 1
    assert calls[0][0] == gguf
    models_dir = env.cache_dir() / "models"
    assert r1.source == "gguf"
    assert r1.spec == str(gguf)
    assert r1.path.parent == models_dir
    assert r1.path == calls[0][1]
    assert r1.path.name.startswith("gguf-x-")
    assert (r1.path / "config.json").is_file()
    assert r1.fingerprint == resolve_model(str(tiny_model_dir)).fingerprint

    r2 = resolve_model(str(gguf))
    assert len(calls) == 1, "second resolve converted again"
    assert r2 == r1

    # Different bytes under the same file name get their own cache entry.
    gguf.write_bytes(b"GGUF other content")
    r3 = resolve_model(str(gguf))
    assert len(calls) == 2
    assert r3.path != r1.path and r3.path.name.startswith("gguf-x-")


def test_gguf_crash_in_convert_leaves_no_cache(tiny_model_dir, tmp_path, monkeypatch):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def crashing(g, target):
        calls.append(target)
        raise RuntimeError("boom mid-conversion")

    monkeypatch.setattr(models, "_convert_gguf", crashing)
    with pytest.raises(RuntimeError, match="boom"):
        resolve_model(str(gguf))
    target = calls[0]
    assert not (target / "config.json").exists()

    ok_calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(tiny_model_dir, ok_calls))
    r = resolve_model(str(gguf))
    assert len(ok_calls) == 1, "a failed conversion must be retried on the next call"
    assert r.path == target and (target / "config.json").is_file()


class _LoaderFromFolder:
    """Stands in for transformers' Auto* classes: 'reads' a GGUF by loading the tiny folder."""

    def __init__(self, real, folder, seen):
        self.real, self.folder, self.seen = real, folder, seen

    def from_pretrained(self, path, gguf_file=None, **kwargs):
        self.seen.append(gguf_file)
        return self.real.from_pretrained(self.folder, **kwargs)


def test_real_convert_is_atomic_and_records_source(tiny_model_dir, tmp_path, monkeypatch):
    """The real _convert_gguf (loaders stubbed): a crash after the weights were written leaves no
    config.json in the target; the retry produces a complete folder and the provenance file."""
    import transformers

    seen = []
    monkeypatch.setattr(transformers, "AutoTokenizer",
                        _LoaderFromFolder(transformers.AutoTokenizer, tiny_model_dir, seen))
    monkeypatch.setattr(transformers, "AutoModelForCausalLM",
                        _LoaderFromFolder(transformers.AutoModelForCausalLM, tiny_model_dir, seen))
    from test_census import write_gguf

    gguf = write_gguf(tmp_path / "tiny.gguf", {"blk.0.ffn_up.weight": (np.ones((2, 32), np.float32), "Q4_0"),
                                               "output_norm.weight": (np.ones(32, np.float32), "F32")})

    real_versions = models.env.versions

    def crash():
        raise RuntimeError("crash after saving")

    monkeypatch.setattr(models.env, "versions", crash)  # called after save_pretrained, before rename
    with pytest.raises(RuntimeError, match="crash after saving"):
        resolve_model(str(gguf))
    targets = [p for p in (env.cache_dir() / "models").iterdir() if p.is_dir() and not p.name.endswith(".tmp")]
    assert all(not (p / "config.json").exists() for p in targets)
    assert seen and set(seen) == {"tiny.gguf"}

    monkeypatch.setattr(models.env, "versions", real_versions)
    r = resolve_model(str(gguf))
    assert r.source == "gguf"
    assert (r.path / "config.json").is_file() and (r.path / "model.safetensors").is_file()
    assert not r.path.with_name(r.path.name + ".tmp").exists()
    src = json.loads((r.path / "qeval-source.json").read_text())
    assert src["gguf"] == str(gguf)
    assert src["gguf_sha256"] == models.sha256_file(gguf)
    assert src["gguf_types"] == {"F32": 1, "Q4_0": 1}  # the file's own types, for the banner
    assert r.fingerprint == resolve_model(str(r.path)).fingerprint  # the cache is an ordinary folder
    lm = load_model(r, FORMATS.get("none"), "cpu")
    assert lm.dtype == "float32"
    assert lm.footprint.checkpoint_dtype == "float32" and lm.footprint.checkpoint_types == {"F32": 1, "Q4_0": 1}


def test_corrupt_gguf_is_a_qeval_error(tmp_path):
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"GGUFjunk" * 16)
    with pytest.raises(QevalError) as ei:
        resolve_model(str(gguf))
    msg = str(ei.value)
    assert repr(str(gguf)) in msg
    assert "GGUF model transformers can read" in msg and "corrupt" in msg
    models_dir = env.cache_dir() / "models"
    assert not any((p / "config.json").exists() for p in models_dir.iterdir() if p.is_dir())


@pytest.mark.slow
def test_gguf_parsed_once_gives_what_three_parses_give(monkeypatch):
    """`_parse_once` (the conversion's speed-up: transformers parsed the embedded GGUF three times)
    hands every caller one reader and one tensor-name map; what transformers reads through them is
    what it reads without (the full conversion was compared byte for byte by hand: same sha256 of
    model.safetensors, tokenizer.json and the configs)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = models.EMBEDDED.get("smollm2-135m")()
    plain = load_gguf_checkpoint(str(path), return_tensors=False)
    original, made = gguf.GGUFReader, []

    def counting(*a, **k):
        made.append(a)
        return original(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == "llama")
    with models._parse_once():
        first = load_gguf_checkpoint(str(path), return_tensors=False)
        again = load_gguf_checkpoint(str(path), return_tensors=False)
        named = gguf.get_tensor_name_map(arch, 30)
        assert gguf.get_tensor_name_map(arch, 30) is named  # built once
    assert gguf.GGUFReader is counting  # restored on exit
    assert len(made) == 1 and first == plain and again == plain
    assert named.mapping == gguf.get_tensor_name_map(arch, 30).mapping
