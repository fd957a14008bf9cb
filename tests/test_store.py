"""The result store (qeval/store.py): immutable records by content key in one SQLite file."""
import zlib

import pytest

pytestmark = pytest.mark.unit

import qeval.store.store as store_mod
from qeval.store.record import Record
from qeval.store.store import Store, canonical_json, content_key
from tests.records import make_record

_REAL_COMPRESS = zlib.compress

# Pinned: if this changes, every stored result's key changed (so every cached cell would rerun).
GOLDEN_KEY = "c72a8279536a3e99564cb8cd3692d04d934bf9c700573570c6bce6e079d70c39"


def _record(key: str, variant: str = "tiny@none", task: str = "qeval_analogy",
            created_at: str = "2024-06-11T00:00:00Z", acc: float = 0.5) -> Record:
    return make_record(key=key, variant_id=variant, task={"name": task, "limit": 16}, created_at=created_at,
                       metrics={"acc": {"value": acc, "stderr": None, "higher_is_better": True}})


SAMPLES = [{"doc_id": 0, "pred": 1, "gold": 1, "text": "Athens is to Greece"},
           {"doc_id": 1, "pred": 0, "gold": 2, "text": "caf\u00e9 \u2014 unicode"}]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "results" / "qeval.sqlite")
    yield s
    s.close()


def test_round_trip(store):
    rec = _record("k1")
    assert "k1" not in store
    assert len(store) == 0
    assert store.put(rec, SAMPLES) is True
    assert "k1" in store
    assert "k2" not in store
    assert len(store) == 1
    assert store.get("k1") == rec
    assert store.samples("k1") == SAMPLES
    assert store.get("k2") is None and store.samples("k2") is None


def test_put_without_samples(store):
    assert store.put(_record("k1"))
    assert store.get("k1") == _record("k1")
    assert store.samples("k1") is None
    assert store.put(_record("k2"), [])
    assert store.samples("k2") == []


def test_records_are_immutable(store):
    original = _record("k1", acc=0.5)
    assert store.put(original, SAMPLES)
    changed = _record("k1", acc=0.99, created_at="2030-01-01T00:00:00Z")
    assert store.put(changed, [{"doc_id": 0, "pred": 9}]) is False
    assert store.get("k1") == original
    assert store.samples("k1") == SAMPLES
    assert len(store) == 1


def test_records_survive_reopen(tmp_path):
    path = tmp_path / "qeval.sqlite"
    with Store(path) as s:
        assert s.put(_record("b", created_at="2024-01-02"), SAMPLES)
        assert s.put(_record("a", created_at="2024-01-02"))
        assert s.put(_record("c", created_at="2024-01-01", task="qeval_lee_ppl"))
    with Store(path) as s:
        assert len(s) == 3
        assert "a" in s and "b" in s and "c" in s
        assert s.get("b") == _record("b", created_at="2024-01-02")
        assert s.samples("b") == SAMPLES
        # listed by creation time, then key
        assert [r.key for r in s.records()] == ["c", "a", "b"]


def test_golden_content_key():
    obj = {"a": 1, "b": [1, 2], "c": {"z": None, "y": "x"}}
    assert content_key(obj) == GOLDEN_KEY
    reordered = {"c": {"y": "x", "z": None}, "b": [1, 2], "a": 1}
    assert content_key(reordered) == GOLDEN_KEY
    assert canonical_json(reordered) == '{"a":1,"b":[1,2],"c":{"y":"x","z":null}}'


def test_content_key_sensitive_to_values():
    base = {"a": 1, "b": [1, 2], "c": {"z": None, "y": "x"}}
    assert content_key({**base, "a": 2}) != GOLDEN_KEY
    assert content_key({**base, "b": [2, 1]}) != GOLDEN_KEY  # list order matters
    assert content_key({**base, "a": "1"}) != GOLDEN_KEY  # types matter
    assert content_key({**base, "d": None}) != GOLDEN_KEY


def test_failure_inside_transaction_stores_nothing(store, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("compression failed")

    monkeypatch.setattr(store_mod.zlib, "compress", boom)
    with pytest.raises(RuntimeError, match="compression failed"):
        store.put(_record("k1"), SAMPLES)
    assert "k1" not in store
    assert store.get("k1") is None
    assert store.samples("k1") is None
    assert len(store) == 0

    # the rollback left the connection usable, and the key is still free
    monkeypatch.setattr(store_mod.zlib, "compress", _REAL_COMPRESS)
    assert store.put(_record("k1"), SAMPLES) is True
    assert store.samples("k1") == SAMPLES


def test_failure_is_not_visible_to_another_connection(tmp_path, monkeypatch):
    path = tmp_path / "qeval.sqlite"
    with Store(path) as writer, Store(path) as reader:
        monkeypatch.setattr(store_mod.zlib, "compress", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
        with pytest.raises(OSError):
            writer.put(_record("k1"), SAMPLES)
        assert "k1" not in reader and len(reader) == 0


def test_two_stores_on_one_file(tmp_path):
    path = tmp_path / "shared.sqlite"
    s1, s2 = Store(path), Store(path)
    try:
        assert s1.put(_record("from-1", variant="v1"), SAMPLES)
        assert s2.put(_record("from-2", variant="v2"), [{"doc_id": 7}])
        for s in (s1, s2):
            assert len(s) == 2
            assert "from-1" in s and "from-2" in s
            assert s.get("from-1").variant_id == "v1"
            assert s.samples("from-2") == [{"doc_id": 7}]
        # the second writer of an existing key loses, whichever connection it uses
        assert s2.put(_record("from-1", variant="other")) is False
        assert s1.get("from-1").variant_id == "v1"
    finally:
        s1.close()
        s2.close()
    with Store(path) as s:
        assert sorted(r.key for r in s.records()) == ["from-1", "from-2"]
