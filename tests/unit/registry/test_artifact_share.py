"""The shared artifact store on a local MLflow artifact root: files travel once by content, fetches link what this
host's store already holds, and nothing damaged or incomplete lands."""

import os

import pytest

from registry.artifact_share import MlflowArtifactShare
from tasks import store

WEIGHTS = os.urandom(200_000)


def _entry(final, files: dict):
    with store.atomic_dir(final) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                (tmp / rel).write_bytes(data)
            else:
                os.link(data, tmp / rel)  # a hard link to another entry's file, as quantize links base weights
        return store.write_manifest(tmp, {"stage": "x", "key": final.name})


@pytest.fixture()
def published(tmp_path, monkeypatch):
    """Host A: an imported model and a quantized checkpoint hard-linking its weights, both published."""
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(tmp_path / "host-a"))
    share = MlflowArtifactShare(str(tmp_path / "mlartifacts" / "store"))
    model = store.stage_dir("models", "m1")
    _entry(model, {"model.safetensors": WEIGHTS, "config.json": b"{}"})
    quantized = store.stage_dir("quantized/fp8", "q1")
    _entry(quantized, {"fakequant/model.safetensors": model / "model.safetensors", "fakequant/quant_state.json": b"1"})
    share.publish("models/m1", model)
    share.publish("quantized/fp8/q1", quantized)
    return share, tmp_path


def _blobs(tmp_path):
    return sorted(p for p in (tmp_path / "mlartifacts" / "store" / "blobs").rglob("*") if p.is_file())


def test_each_file_travels_once_by_content(published):
    share, tmp_path = published
    blobs = _blobs(tmp_path)
    assert len(blobs) == 3  # weights, config, quantizer state: the linked weights were not uploaded again
    assert sum(p.stat().st_size for p in blobs) == len(WEIGHTS) + 2 + 1
    assert (tmp_path / "mlartifacts" / "store" / "quantized" / "fp8" / "q1" / "manifest.json").is_file()


def test_a_fetch_links_what_this_host_holds_and_verifies_everything(published, monkeypatch):
    share, tmp_path = published
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(tmp_path / "host-b"))
    model, quantized = store.stage_dir("models", "m1"), store.stage_dir("quantized/fp8", "q1")
    assert share.fetch("models/m1", model) and share.fetch("quantized/fp8/q1", quantized)
    assert store.verify(model, full=True) == [] and store.verify(quantized, full=True) == []
    linked = quantized / "fakequant" / "model.safetensors"
    assert linked.stat().st_ino == (model / "model.safetensors").stat().st_ino  # linked, not downloaded again
    assert store.read_manifest(quantized) == store.read_manifest(tmp_path / "host-a" / "quantized" / "fp8" / "q1")


def test_a_damaged_blob_never_lands_and_a_missing_one_means_make_it_here(published, monkeypatch):
    share, tmp_path = published
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(tmp_path / "host-c"))
    [weights] = [p for p in _blobs(tmp_path) if p.stat().st_size == len(WEIGHTS)]
    data = bytearray(weights.read_bytes())
    data[1000] ^= 1
    weights.write_bytes(bytes(data))
    model = store.stage_dir("models", "m1")
    with pytest.raises(store.ArtifactDamaged, match="model.safetensors: sha256"):
        share.fetch("models/m1", model)
    assert not model.exists() and not any(model.parent.iterdir())  # no half-fetched leftovers
    weights.unlink()
    assert share.fetch("models/m1", model) is False and not model.exists()
    assert share.fetch("models/never-published", store.stage_dir("models", "x")) is False
