"""Build: one deployment profile per (checkpoint, target), by the target's backend, with a manifest that pins it.

The manifest records the architecture, GPU, driver, CUDA and toolchain the profile was built with. Loading it
anywhere else is refused by :func:`verify_artifact` with what differs and how to rebuild.
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from tasks import store

log = logging.getLogger(__name__)

BACKENDS = {"reference": "tasks.backends.reference", "trtllm": "tasks.backends.trtllm"}
BASELINE = "none"  # the format name of the unquantized baseline


class ArtifactMismatch(RuntimeError):
    """A profile was asked to load on an architecture or toolchain it was not built for."""


def backend(name: str):
    return importlib.import_module(BACKENDS[name])


@dataclass(frozen=True)
class BuildArtifact:
    target: str
    arch: str
    backend: str
    format: str
    path: str
    fingerprint: str
    manifest: dict
    cached: bool = False


def key_parts(*, checkpoint_fp: str, fmt: str, target, arch: str, toolchain: dict) -> dict:
    """Everything a profile depends on, by name (recorded in its manifest; `plan` diffs them)."""
    return {"checkpoint": checkpoint_fp, "format": fmt, "arch": arch, "toolchain": toolchain,
            "options": target.model_dump(mode="json", exclude={"name", "work_pool"}),
            "code": store.source_digest(sys.modules[__name__], backend(target.backend))}


def profile_dir(model_slug: str, fmt: str, arch: str, tp: int, key: str) -> Path:
    return store.home() / "profiles" / model_slug / fmt / f"{arch}-tp{tp}" / key[:16]


def build(*, model_slug: str, checkpoint_dir: str, checkpoint_fp: str, fmt: str, quant_algo: str | None,
          target, device: dict) -> BuildArtifact:
    """Build (or reuse) the profile of one checkpoint for one target on the device this runs on."""
    impl = backend(target.backend)
    arch = device["arch"]
    toolchain = impl.toolchain_versions()
    parts = key_parts(checkpoint_fp=checkpoint_fp, fmt=fmt, target=target, arch=arch, toolchain=toolchain)
    key = store.key_of("build", parts)
    out = profile_dir(model_slug, fmt, arch, target.tp, key)
    manifest = store.read_manifest(out)
    cached = manifest is not None
    if manifest is None:
        log.info("building %s profile for %s on %s", fmt, target.name, arch)
        with store.atomic_dir(out) as tmp:
            options = impl.build_profile(checkpoint_dir=checkpoint_dir, target=target, device=device, out=tmp)
            manifest = store.write_manifest(tmp, {
                "stage": "build", "key": key, "inputs": parts, "backend": target.backend, "format": fmt, "quant_algo": quant_algo,
                "target": {"name": target.name, "arch": arch, "tp": target.tp, "gpu_name": device.get("gpu_name"),
                           "gpu_count": device.get("gpu_count"), "driver": device.get("driver"),
                           "cuda": device.get("cuda")},
                "toolchain": toolchain, "toolchain_full": store.toolchain(), "build_options": options,
                "checkpoint_fingerprint": checkpoint_fp,
            })
    return BuildArtifact(target.name, arch, target.backend, fmt, str(out), manifest["content_hash"], manifest, cached)


def verify_artifact(profile_dir: str | Path, *, device: dict | None = None, toolchain: dict | None = None) -> dict:
    """Refuse a profile built for another architecture or toolchain; return its manifest when it matches.

    Raises:
        ArtifactMismatch: naming each difference (built vs here) and how to rebuild.
    """
    manifest = store.read_manifest(Path(profile_dir))
    if manifest is None:
        raise ArtifactMismatch(f"{profile_dir}: no manifest.json; this is not a complete profile")
    device = device or store.local_device()
    toolchain = toolchain or backend(manifest["backend"]).toolchain_versions()
    diffs = []
    if manifest["target"]["arch"] != device["arch"]:
        diffs.append(f"architecture: built for {manifest['target']['arch']}, this machine is {device['arch']}")
    for name, built in manifest["toolchain"].items():
        here = toolchain.get(name)
        if built != here:
            diffs.append(f"{name}: built with {built}, installed here {here}")
    if diffs:
        raise ArtifactMismatch(
            f"profile {profile_dir} ({manifest['format']} for target '{manifest['target']['name']}') does not match "
            "this machine:\n  " + "\n  ".join(diffs) + "\nRebuild it here: rerun the recipe on a worker with this "
            "GPU and toolchain (the build cache key includes both, so the rerun builds a new profile).")
    return manifest
