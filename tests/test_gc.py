"""`qeval gc`: cached references, shared heads and adapters no record uses are deleted, with sizes."""
from qeval.core import env
from qeval.cli import main
from qeval.store.store import Store
from tests.records import make_record

ADAPTER = {"device": "cpu", "spec": {"steps": 1}, "trainable_params": 1, "total_params": 1, "adapter_bytes": 1,
           "train_s": 1.0, "s_per_step": 1.0, "tokens_per_s": 1.0, "peak_train_bytes": 1}


def _rec(key, ref=None, head=None, adapter=None):
    return make_record(key=key, created_at=key, divergence_reference=ref, divergence_head=head,
                       adapter={**ADAPTER, "key": adapter} if adapter else None)


def test_gc_keeps_what_records_use(tmp_path, capsys):
    cache = env.cache_dir()
    refs, heads, adapters = cache / "references", cache / "references" / "heads", cache / "adapters"
    for d in (refs, heads, adapters / ("a" * 32), adapters / ("b" * 32)):
        d.mkdir(parents=True, exist_ok=True)
    for f in (refs / ("1" * 32 + ".safetensors"), refs / ("2" * 32 + ".safetensors"),
              heads / ("h" * 32 + ".safetensors"), heads / ("g" * 32 + ".safetensors"),
              adapters / ("a" * 32) / "w.safetensors", adapters / ("b" * 32) / "w.safetensors"):
        f.write_bytes(b"x" * 2**20)
    store = tmp_path / "s.sqlite"
    with Store(store) as s:
        s.put(_rec("k1", "1" * 64, "h" * 64, "a" * 64))
    before = store.read_bytes()
    assert main(["gc", "--store", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would delete") == 3 and "1.0 MiB" in out and "would free 3.0 MiB" in out
    assert (refs / ("2" * 32 + ".safetensors")).exists()
    assert main(["gc", "--store", str(store)]) == 0
    assert not (refs / ("2" * 32 + ".safetensors")).exists() and not (heads / ("g" * 32 + ".safetensors")).exists()
    assert not (adapters / ("b" * 32)).exists()
    assert (refs / ("1" * 32 + ".safetensors")).exists() and (heads / ("h" * 32 + ".safetensors")).exists()
    assert (adapters / ("a" * 32)).exists()
    assert store.read_bytes() == before  # gc reads the store, never writes it


def test_reference_head_stored_once(tmp_path):
    """Per-task references hold only hidden states; the (V, H) head is one file per model."""
    import torch

    from qeval.eval.divergence import Reference

    head = tmp_path / "heads" / "m.safetensors"
    w = torch.randn(300, 16)
    for task in ("a", "b"):
        Reference({"k": torch.randn(5, 16)}, w, None, None).save(tmp_path / f"{task}.safetensors", head)
    assert head.is_file()
    for task in ("a", "b"):
        assert (tmp_path / f"{task}.safetensors").stat().st_size < head.stat().st_size
        back = Reference.load(tmp_path / f"{task}.safetensors", head)
        assert torch.equal(back.weight, w) and back.hidden["k"].shape == (5, 16)
    legacy = tmp_path / "legacy.safetensors"  # one file, head inside: still loads
    Reference({"k": torch.randn(5, 16)}, w, None, None).save(legacy)
    assert torch.equal(Reference.load(legacy, head).weight, w)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
