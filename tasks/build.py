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


def backend_code(name: str) -> list:
    """The backend's modules: its own and the `PARTS` it keeps elsewhere (a profile's key covers them all, since
    the profile is built, evaluated and served by that code)."""
    module = backend(name)
    return [module, *(importlib.import_module(part) for part in getattr(module, "PARTS", ()))]


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
            "code": store.source_digest(sys.modules[__name__], *backend_code(target.backend))}


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
    records = {f"{linked_as}/{rel}": meta for rel, meta in store.manifest_records_under(root, Path(checkpoint_dir)).items()}
    return records, volatile


def _build(impl, checkpoint_dir, target, device, key, parts, fmt, quant_algo, toolchain, checkpoint_fp, out) -> dict:
    arch = device["arch"]
    log.info("building %s profile for %s on %s", fmt, target.name, arch)
    records, volatile = _checkpoint_records(checkpoint_dir, getattr(impl, "CHECKPOINT", "checkpoint"))
    with store.atomic_dir(out) as tmp:
        options = impl.build_profile(checkpoint_dir=checkpoint_dir, target=target, device=device, out=tmp)
        return store.write_manifest(tmp, {
            "stage": "build", "key": key, "inputs": parts, "backend": target.backend, "format": fmt, "quant_algo": quant_algo,
            "target": {"name": target.name, "arch": arch, "tp": target.tp, "gpu_name": device.get("gpu_name"),
                       "gpu_memory_gib": device.get("gpu_memory_gib"),
                       "gpu_count": device.get("gpu_count"), "driver": device.get("driver"),
                       "cuda": device.get("cuda")},
            "toolchain": toolchain, "toolchain_full": store.toolchain(), "build_options": options,
            "checkpoint_fingerprint": checkpoint_fp,
        }, files=records, volatile=volatile)


def verify_artifact(profile_dir: str | Path, *, device: dict | None = None, toolchain: dict | None = None,
                    full: bool = True, sizes_only: bool = False) -> dict:
    """Refuse a profile whose files do not match their digests, or that was built for another architecture or
    toolchain; return its manifest when it matches.

    Raises:
        store.ArtifactDamaged: naming each file that is missing or differs.
        ArtifactMismatch: naming each difference (built vs here) and how to rebuild.
    """
    manifest = store.read_manifest(Path(profile_dir))
    if manifest is None:
        raise ArtifactMismatch(f"{profile_dir}: no manifest.json; this is not a complete profile")
    store.check(Path(profile_dir), full=full, sizes_only=sizes_only)
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
    built_on, here = manifest["target"].get("gpu_name"), device.get("gpu_name")
    if built_on and here and built_on != here:  # same arch: the kernels run, the measurements were of another GPU
        log.warning("profile %s was built and measured on %s; this machine has %s (both %s): it loads, but its "
                    "latency numbers%s are the other GPU's; `enginewright resolve --gpu` prefers a build for this GPU",
                    profile_dir, built_on, here, device["arch"],
                    " and autotuned kernels" if manifest["backend"] == "trtllm" else "")
    return manifest
