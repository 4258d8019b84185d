import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tasks import store
from tasks.host import machine
from tasks.store import digests


def _artifact(final, files: dict[str, bytes], key="k", volatile=()):
    with store.atomic_dir(final) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        return store.write_manifest(tmp, {"stage": "x", "key": key}, volatile=volatile)


def test_atomic_dir_publishes_only_complete_artifacts(tmp_path):
    final = tmp_path / "a" / "key"
    with pytest.raises(RuntimeError, match="boom"):
        with store.atomic_dir(final) as tmp:
            (tmp / "weights.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not final.exists()
    assert list((tmp_path / "a").iterdir()) == []  # no half-written leftovers


def test_atomic_dir_requires_a_manifest(tmp_path):
    with pytest.raises(RuntimeError, match="manifest"):
        with store.atomic_dir(tmp_path / "k") as tmp:
            (tmp / "f").write_text("1")
    assert not (tmp_path / "k").exists()


def test_manifest_is_written_last_and_records_each_files_size_and_digest(tmp_path):
    manifest = _artifact(tmp_path / "k", {"f": b"1", "sub/g": b"22"})
    assert store.read_manifest(tmp_path / "k") == json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["files"]["sub/g"] == {"size": 2, "sha256": store.sha256_file(tmp_path / "k" / "sub" / "g")}
    assert store.verify(tmp_path / "k", full=True) == []


def test_fingerprint_comes_from_key_and_deterministic_content_not_volatile_files(tmp_path):
    a = _artifact(tmp_path / "a", {"w": b"weights", "state.pth": b"pickle-1"}, volatile=("state.pth",))
    b = _artifact(tmp_path / "b", {"w": b"weights", "state.pth": b"pickle-2"}, volatile=("state.pth",))
    assert a["content_hash"] == b["content_hash"]  # two quantizations of the same inputs dedupe
    c = _artifact(tmp_path / "c", {"w": b"weights!", "state.pth": b"pickle-1"}, volatile=("state.pth",))
    assert c["content_hash"] != a["content_hash"]
    assert _artifact(tmp_path / "d", {"w": b"weights", "state.pth": b"pickle-1"}, key="other",
                     volatile=("state.pth",))["content_hash"] != a["content_hash"]


def _flip(path, offset=10):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_verify_names_a_flipped_byte_a_deleted_file_and_a_truncated_one(tmp_path):
    _artifact(tmp_path / "k", {"a.bin": os.urandom(100), "b.bin": os.urandom(50), "c.bin": os.urandom(30)})
    assert store.verify(tmp_path / "k") == []
    _flip(tmp_path / "k" / "a.bin")
    (tmp_path / "k" / "b.bin").unlink()
    (tmp_path / "k" / "c.bin").write_bytes(b"short")
    problems = store.verify(tmp_path / "k")
    assert any(p.startswith("a.bin: sha256") for p in problems)
    assert "b.bin: missing (manifest records 50 bytes)" in problems
    assert "c.bin: 5 bytes, manifest records 30" in problems
    assert store.verify(tmp_path / "k", sizes_only=True) == [p for p in problems if not p.startswith("a.bin")]
    with pytest.raises(store.ArtifactDamaged, match="a.bin: sha256"):
        store.check(tmp_path / "k", full=True)


def _flip_keeping_size_and_mtime(path):
    st = path.stat()
    _flip(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # `touch -r`: mtime set back; ctime cannot be
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_flip_that_keeps_size_and_mtime_is_caught_on_reuse(caplog):
    out = store.stage_dir("models", "flip")
    _artifact(out, {"a.bin": os.urandom(100), "b.bin": os.urandom(100)})
    assert store.reuse(out) is not None  # digests remembered: the next reuse reads nothing unchanged
    _flip_keeping_size_and_mtime(out / "a.bin")
    assert store.reuse(out) is None and not out.exists()
    assert "a.bin: sha256" in caplog.text and "b.bin" not in caplog.text


def test_reuse_does_not_reread_unchanged_files_nor_a_hard_link_the_store_made(tmp_path, monkeypatch):
    out = store.stage_dir("models", "linked")
    _artifact(out, {"w.bin": os.urandom(1000)})
    assert store.verify(out) == []
    store.link_or_copy(out / "w.bin", tmp_path / "linked.bin")  # sets w.bin's ctime: the digest is carried over
    calls = []
    monkeypatch.setattr("tasks.store.digests.sha256_file", lambda p, *a: calls.append(p) or "x")
    assert store.verify(out) == [] and store.reuse(out) is not None and calls == []
    os.chmod(out / "w.bin", 0o600)  # any other change of ctime: hashed again
    assert store.verify(out) != [] and calls == [out / "w.bin"]


def test_verify_store_hashes_every_entry_in_full_and_names_a_flipped_byte():
    good, bad = store.stage_dir("models", "good"), store.stage_dir("quantized/fp8", "bad")
    _artifact(good, {"w.bin": os.urandom(100)})
    _artifact(bad, {"sub/w.bin": os.urandom(100)})
    (store.home() / "mlartifacts" / "x").mkdir(parents=True)
    (store.home() / "mlartifacts" / "x" / "manifest.json").write_text("{}")  # not the store: left to the registry
    assert store.verify_store() == {good: [], bad: []}
    rotten = bad / "sub" / "w.bin"
    _flip(rotten)  # then, as bit rot would leave it, the digest cache still holding the old digest for the file:
    digests.remember([(digests.stat_key(rotten.stat()), store.read_manifest(bad)["files"]["sub/w.bin"]["sha256"])])
    assert store.verify(bad) == []  # reuse trusts the remembered digest
    found = store.verify_store()
    assert found[good] == [] and len(found[bad]) == 1 and found[bad][0].startswith("sub/w.bin: sha256")


def test_reuse_removes_a_damaged_entry_and_says_which_file(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(tmp_path))
    out = store.stage_dir("models", "abc")
    _artifact(out, {"w.bin": os.urandom(64)})
    assert store.reuse(out) is not None
    _flip(out / "w.bin")
    assert store.reuse(out) is None
    assert not out.exists()
    assert "w.bin: sha256" in caplog.text and "rebuilding" in caplog.text


def test_hashing_writer_digest_equals_a_read_of_the_file(tmp_path):
    record = store.write_bytes(tmp_path / "f", b"x" * 3_000_000)
    assert record == {"size": 3_000_000, "sha256": store.sha256_file(tmp_path / "f")}


def test_digest_cache_does_not_reread_an_unchanged_file(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(1000))
    first = store.cached_sha256(path)
    calls = []
    monkeypatch.setattr("tasks.store.digests.sha256_file", lambda p, *a: calls.append(p) or "x")
    assert store.cached_sha256(path) == first and calls == []
    path.write_bytes(os.urandom(1000))  # changed: hashed again
    store.cached_sha256(path)
    assert calls == [path]


def test_claim_makes_a_second_builder_wait_and_reuse(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(tmp_path))
    out = store.stage_dir("x", "key1")
    builds = []

    def worker():
        with store.claim(out) as manifest:
            if manifest is None:
                builds.append(1)
                time.sleep(0.3)
                _artifact(out, {"f": b"1"})

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1]


def test_sweep_removes_temporaries_of_killed_writers_only(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(tmp_path))
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from tasks import store\n"
            "cm = store.atomic_dir(store.stage_dir('quantized/fp8', 'k' * 24)); tmp = cm.__enter__()\n"
            "(tmp / 'w.bin').write_bytes(b'x' * 1000); os._exit(9)")  # killed mid-write: no cleanup runs
    subprocess.run([sys.executable, "-c", code, os.getcwd()], check=False)
    orphans = list((tmp_path / "quantized" / "fp8").glob(".*.tmp-*"))
    assert len(orphans) == 1
    with store.atomic_dir(store.stage_dir("quantized/fp8", "live" * 6)) as live:  # a writer still running
        assert store.sweep_temporaries() == orphans
        assert live.exists()
        store.write_manifest(live, {"key": "live"})
    assert not orphans[0].exists()


def test_key_is_stable_and_sensitive():
    assert store.key_of("a", {"x": 1, "y": 2}) == store.key_of("a", {"y": 2, "x": 1})
    assert store.key_of("a", {"x": 1}) != store.key_of("a", {"x": 2})


def test_local_device_reports_cpu_arch_without_cuda():
    import torch

    device = machine.local_device()
    if not torch.cuda.is_available():
        assert device["arch"].startswith("cpu-") and device["gpu_count"] == 0
