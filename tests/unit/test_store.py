import json

import pytest

from tasks import store


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


def test_manifest_is_written_last_and_hashes_the_content(tmp_path):
    with store.atomic_dir(tmp_path / "k") as tmp:
        (tmp / "f").write_text("1")
        manifest = store.write_manifest(tmp, {"stage": "x"})
    assert store.read_manifest(tmp_path / "k") == json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["content_hash"] == store.fingerprint_dir(tmp_path / "k")
    (tmp_path / "k" / "f").write_text("2")
    assert store.fingerprint_dir(tmp_path / "k") != manifest["content_hash"]


def test_key_is_stable_and_sensitive():
    assert store.key_of("a", {"x": 1, "y": 2}) == store.key_of("a", {"y": 2, "x": 1})
    assert store.key_of("a", {"x": 1}) != store.key_of("a", {"x": 2})


def test_local_device_reports_cpu_arch_without_cuda():
    import torch

    device = store.local_device()
    if not torch.cuda.is_available():
        assert device["arch"].startswith("cpu-") and device["gpu_count"] == 0
