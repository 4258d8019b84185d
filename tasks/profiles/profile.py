"""A deployment profile: the one object that travels from build to serving. What it is (:class:`BuildArtifact`,
where it lives) and the check every use makes before trusting it (:func:`verify_artifact`).

The manifest records the architecture, GPU, driver, CUDA and toolchain the profile was built with. Loading it
anywhere else is refused by :func:`verify_artifact` with what differs and how to rebuild.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tasks import backends, store
from tasks.base.errors import Refused
from tasks.host import machine

log = logging.getLogger(__name__)

BASELINE = "none"  # the format name of the unquantized baseline


class ArtifactMismatch(Refused):
    """A profile was asked to load on an architecture or toolchain it was not built for."""


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


def profile_dir(model_slug: str, fmt: str, arch: str, tp: int, key: str) -> Path:
    return store.home() / "profiles" / model_slug / fmt / f"{arch}-tp{tp}" / key[:16]


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
    device = device or machine.local_device()
    impl = backends.get(manifest["backend"])
    toolchain = toolchain or impl.toolchain_versions()
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
                    " and autotuned kernels" if impl.AUTOTUNED else "")
    return manifest
