"""The build stage: one deployment profile per (checkpoint, target), by the target's backend, with a manifest that
pins it (what a profile is, and its verification on load: profile.py)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tasks import backends, store
from tasks.host import machine
from tasks.profiles import profile
from tasks.profiles.profile import BuildArtifact, profile_dir

log = logging.getLogger(__name__)


def key_parts(*, checkpoint_fp: str, fmt: str, target, arch: str, toolchain: dict) -> dict:
    """Everything a profile depends on, by name (recorded in its manifest; `plan` diffs them)."""
    return {"checkpoint": checkpoint_fp, "format": fmt, "arch": arch, "toolchain": toolchain,
            "options": target.model_dump(mode="json", exclude={"name", "work_pool"}),
            "code": store.key_of(store.source_digest(sys.modules[__name__], profile),
                                 store.package_digest(backends.code_dir(target.backend)))}


def out_dir(model_slug: str, fmt: str, arch: str, tp: int, parts: dict) -> Path:
    """Where the profile of these key parts is stored."""
    return profile_dir(model_slug, fmt, arch, tp, store.key_of("build", parts))


def build(*, model_slug: str, checkpoint_dir: str, checkpoint_fp: str, fmt: str, quant_algo: str | None,
          target, device: dict) -> BuildArtifact:
    """Build (or reuse) the profile of one checkpoint for one target on the device this runs on."""
    impl = backends.get(target.backend)
    arch = device["arch"]
    toolchain = impl.toolchain_versions()
    parts = key_parts(checkpoint_fp=checkpoint_fp, fmt=fmt, target=target, arch=arch, toolchain=toolchain)
    key = store.key_of("build", parts)
    out = out_dir(model_slug, fmt, arch, target.tp, parts)
    manifest, cached = store.reuse_or_make(out, lambda out: _build(impl, checkpoint_dir, target, device, key, parts,
                                                                   fmt, quant_algo, toolchain, checkpoint_fp, out))
    return BuildArtifact(target.name, arch, target.backend, fmt, str(out), manifest["content_hash"], manifest, cached)


def _checkpoint_records(checkpoint_dir: str, linked_as: str) -> tuple[dict[str, dict], tuple[str, ...]]:
    """Digests (and volatile files) of the checkpoint as the profile links it, from the checkpoint artifact's own
    manifest, so linking a multi-GB checkpoint into a profile hashes nothing; empty for one outside the store."""
    root = store.artifact_root(Path(checkpoint_dir))
    if root is None:
        return {}, ()
    sub = Path(checkpoint_dir).relative_to(root).as_posix()
    prefix = "" if sub == "." else sub + "/"
    volatile = tuple(f"{linked_as}/{v[len(prefix):]}" for v in store.read_manifest(root).get("volatile", [])
                     if v.startswith(prefix))
    records = {f"{linked_as}/{rel}": meta
               for rel, meta in store.manifest_records_under(root, Path(checkpoint_dir)).items()}
    return records, volatile


def _build(impl, checkpoint_dir, target, device, key, parts, fmt, quant_algo, toolchain, checkpoint_fp, out) -> dict:
    arch = device["arch"]
    log.info("building %s profile for %s on %s", fmt, target.name, arch)
    records, volatile = _checkpoint_records(checkpoint_dir, impl.CHECKPOINT)
    with store.atomic_dir(out) as tmp:
        options = impl.build_profile(checkpoint_dir=checkpoint_dir, target=target, device=device, out=tmp)
        return store.write_manifest(tmp, {
            "stage": "build", "key": key, "inputs": parts, "backend": target.backend, "format": fmt,
            "quant_algo": quant_algo,
            "target": {"name": target.name, "arch": arch, "tp": target.tp, "gpu_name": device.get("gpu_name"),
                       "gpu_memory_gib": device.get("gpu_memory_gib"),
                       "gpu_count": device.get("gpu_count"), "driver": device.get("driver"),
                       "cuda": device.get("cuda")},
            "toolchain": toolchain, "toolchain_full": machine.toolchain(), "build_options": options,
            "checkpoint_fingerprint": checkpoint_fp,
        }, files=records, volatile=volatile)


