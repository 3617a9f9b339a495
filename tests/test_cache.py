import json
import os
import subprocess
import sys
import time

import pytest

from pipeline.cache import ArtifactCache
from pipeline.gc import collect
from pipeline.hashing import chain_key


def _put(store: ArtifactCache, key: str, payload: bytes = b"weights", created: float | None = None):
    with store.building(key) as tmp:
        (tmp / "model.onnx").write_bytes(payload)
        meta = {"stage": "export", "created": created if created is not None else time.time()}
        return store.commit(key, tmp, meta)


def test_keys_are_full_sha256_and_chain():
    a = chain_key({"parent": None, "stage": "export", "config": {"opset": 18}})
    b = chain_key({"parent": None, "stage": "export", "config": {"opset": 17}})
    c = chain_key({"config": {"opset": 18}, "stage": "export", "parent": None})
    assert len(a) == 64 and a != b and a == c


def test_commit_then_lookup(tmp_path):
    store = ArtifactCache(tmp_path)
    key = chain_key("k")
    _put(store, key)
    entry = store.lookup(key)
    assert entry is not None and entry.file("model.onnx").read_bytes() == b"weights"
    assert json.loads((entry.path / "manifest.json").read_text())["files"]["model.onnx"]["size"] == 7
    assert not any((tmp_path / ".tmp").iterdir()), "no temporary folder is left behind"


def test_failed_build_leaves_nothing(tmp_path):
    store = ArtifactCache(tmp_path)
    key = chain_key("k")
    with pytest.raises(RuntimeError), store.building(key) as tmp:
        (tmp / "model.onnx").write_bytes(b"half")
        raise RuntimeError("stage crashed")
    assert store.check(key)[0] == "miss"
    assert not any((tmp_path / ".tmp").iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest", "extra", "delete"])
def test_corrupt_entry_is_detected_and_moved_aside(tmp_path, damage):
    store = ArtifactCache(tmp_path)
    key = chain_key("k")
    entry = _put(store, key, b"0123456789")
    target = entry.file("model.onnx")
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[3] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:4])
    elif damage == "manifest":
        (entry.path / "manifest.json").unlink()
    elif damage == "extra":
        (entry.path / "stray.bin").write_bytes(b"x")
    else:
        target.unlink()
    assert store.check(key)[0] == "corrupt"
    assert store.lookup(key) is None
    assert store.check(key)[0] == "miss", "the corrupt entry is no longer served"
    assert len(list((tmp_path / ".corrupt").iterdir())) == 1
    assert store.events and store.events[0].kind == "corrupt"


def test_sweep_removes_builds_of_dead_processes(tmp_path):
    store = ArtifactCache(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / ".tmp" / f"{chain_key('x')}.{dead}.abcd"
    stale.mkdir(parents=True)
    live = tmp_path / ".tmp" / f"{chain_key('y')}.{os.getpid()}.abcd"
    live.mkdir()
    store.sweep_tmp()
    assert not stale.exists() and live.exists()


def test_gc_keeps_recent_runs_and_locked_entries(tmp_path):
    store = ArtifactCache(tmp_path)
    keys = [chain_key(i) for i in range(4)]
    for i, k in enumerate(keys):
        _put(store, k, b"x" * 1000, created=1000.0 + i)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps({"stages": [{"key": keys[0]}]}))
    with store.lock(keys[1]):
        removed, _ = collect(store, keep_runs=5)
    removed_keys = {k for k, _ in removed}
    assert removed_keys == {keys[2], keys[3]}
    assert store.lookup(keys[0]) is not None and store.lookup(keys[1]) is not None


def test_gc_size_budget_deletes_oldest_first(tmp_path):
    store = ArtifactCache(tmp_path)
    keys = [chain_key(i) for i in range(3)]
    for i, k in enumerate(keys):
        _put(store, k, b"x" * 10_000, created=1000.0 + i)
    removed, _ = collect(store, keep_runs=0, max_bytes=25_000)
    assert [k for k, _ in removed] == [keys[0]]


def test_lookups_read_an_unchanged_file_once_and_still_see_a_change(tmp_path, monkeypatch):
    import os
    import time

    import pipeline.hashing as hashing

    cache = ArtifactCache(tmp_path / "cache")
    key = "cd" * 32
    with cache.building(key) as tmp:
        (tmp / "model.onnx").write_bytes(b"x" * 4096)
        cache.commit(key, tmp, {"stage": "export"})
    old = time.time() - 3600  # written long ago: past the window in which a rewrite can keep its mtime
    for f in cache.entry_dir(key).iterdir():
        os.utime(f, (old, old))
    reads = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p: reads.append(p) or real(p))
    assert cache.lookup(key) is not None
    assert reads, "the first lookup hashes the files"
    reads.clear()
    assert ArtifactCache(tmp_path / "cache").lookup(key) is not None  # another process, reading the memo
    assert reads == [], "an unchanged file is not read again"
    (cache.entry_dir(key) / "model.onnx").write_bytes(b"y" * 4096)  # same size, new content
    assert ArtifactCache(tmp_path / "cache").lookup(key) is None
    assert reads, "a rewritten file is hashed again and the corruption found"
