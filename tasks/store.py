"""Content-addressed artifact store: keys, fingerprints, atomic writes, toolchain and device facts.

Every stage writes to ``<home>/<stage>/<key>/`` where the key hashes everything its output depends on. A directory
appears only complete: it is written under a temporary name, ``manifest.json`` last, then renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def home() -> Path:
    """Where artifacts, the MLflow database and Prefect's state live (``ENGINEWRIGHT_HOME``, default ./.enginewright)."""
    return Path(os.environ.get("ENGINEWRIGHT_HOME", ".enginewright")).resolve()


def key_of(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def source_digest(*modules) -> str:
    """Hash of the given modules' source files: a stage's code is an input of its cache key."""
    return key_of([sha256_file(Path(m.__file__)) for m in modules])


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_dir(path: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> str:
    """Hash of every file's relative path and bytes, in sorted order; the manifest itself is excluded."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(file).encode() + b"\n")
    return h.hexdigest()


def stage_dir(stage: str, key: str) -> Path:
    return home() / stage / key[:24]


def read_manifest(path: Path) -> dict | None:
    """The manifest of a complete artifact, or None when there is none (never written, or half-written)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    return json.loads(file.read_text())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it is renamed to ``final``; on error it is removed.

    The caller writes ``manifest.json`` last (see :func:`write_manifest`). If another writer finished the same
    key first, its copy is kept: content-addressed outputs are interchangeable.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"internal error: {final} was not given a manifest")
        if final.exists():
            if read_manifest(final) is not None:
                shutil.rmtree(tmp)
                return
            shutil.rmtree(final)  # a leftover without a manifest is not an artifact
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Fingerprint the directory's content, record it, and write the manifest (the last file written)."""
    manifest = {**manifest, "content_hash": fingerprint_dir(directory)}
    tmp = Path(directory) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, Path(directory) / MANIFEST)
    return manifest


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link files when on the same filesystem (artifacts are immutable), else copy."""
    for file in Path(src).rglob("*"):
        if file.is_dir():
            continue
        target = Path(dst) / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


TOOLCHAIN_DISTS = {
    "torch": "torch",
    "transformers": "transformers",
    "modelopt": "nvidia-modelopt",
    "lm_eval": "lm_eval",
    "tensorrt_llm": "tensorrt_llm",
    "tensorrt": "tensorrt",
}


def toolchain() -> dict[str, str | None]:
    return {name: version_of(dist) for name, dist in TOOLCHAIN_DISTS.items()} | {"python": platform.python_version()}


def local_device() -> dict[str, Any]:
    """What this process would run on: ``sm_XY`` with GPU facts when CUDA is available, else ``cpu-<machine>``."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        props = torch.cuda.get_device_properties(0)
        return {
            "arch": f"sm_{major}{minor}",
            "device": "cuda",
            "gpu_name": torch.cuda.get_device_name(0),
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        }
    return {
        "arch": f"cpu-{platform.machine()}",
        "device": "cpu",
        "gpu_name": None,
        "gpu_count": 0,
        "cpu": platform.processor() or platform.machine(),
        "cuda": None,
        "driver": None,
    }


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # nvml missing or no driver: the manifest says unknown rather than guessing
        return None
