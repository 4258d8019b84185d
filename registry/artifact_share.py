"""Stage outputs shared between hosts through MLflow's artifact store (the one place artifacts live between hosts).

A stage output ``<stage>/<key>/`` made on one host is published under ``<artifact root of the enginewright-store
experiment>/store/``: each file once, by content, as ``blobs/<sha256[:2]>/<sha256>`` (a blob already there is not
uploaded again: the base weights a quantized checkpoint hard-links travel once, with the imported model), then its
manifest as ``<stage>/<key>/manifest.json``, last, so a reader that finds the manifest finds every file. Another host
fetches it by the same content key into its local store (a cache of this one): a file whose digest an entry of its
own store already holds is hard-linked from there, the others are downloaded, and every digest is verified before
the directory appears. Works wherever MLflow's artifact repositories do: a local ``mlartifacts`` directory, the
tracking server's artifact proxy (``mlflow-artifacts:``), S3/GCS behind it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from tasks import store
from tasks.base.settings import settings

log = logging.getLogger(__name__)

EXPERIMENT = "enginewright-store"
# What another host needs: the imported model, the calibration set, the quantized checkpoints. Profiles are built
# on their target's host and reach other hosts through the registry; evaluation results are small and per host.
SHARED_STAGES = ("models/", "calibration/", "quantized/")
BLOBS = "blobs"


class MlflowArtifactShare(store.Remote):
    def __init__(self, root: str):
        self.root = root.rstrip("/")

    @classmethod
    def from_tracking(cls) -> "MlflowArtifactShare":
        from registry.client import client, experiment_id

        return cls(client().get_experiment(experiment_id(EXPERIMENT)).artifact_location.rstrip("/") + "/store")

    def _repo(self, rel: str):
        return get_artifact_repository(f"{self.root}/{rel}")

    @staticmethod
    def _blob_dir(sha256: str) -> str:
        return f"{BLOBS}/{sha256[:2]}"

    def fetch(self, rel: str, dest: Path) -> bool:
        if not rel.startswith(SHARED_STAGES):
            return False
        with tempfile.TemporaryDirectory() as scratch:
            try:
                manifest_file = self._repo(rel).download_artifacts(store.MANIFEST, scratch)
            except (MlflowException, OSError):
                return False  # not published (yet)
            manifest = json.loads(Path(manifest_file).read_text())
        records = manifest.get("files", {})
        local = _local_files_by_digest({m["sha256"] for m in records.values()}, exclude=dest)
        tmp = store.temporary_sibling(dest)
        tmp.mkdir(parents=True)
        downloaded = 0
        try:
            for name, meta in records.items():
                target = tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if (source := local.get(meta["sha256"])) is not None:
                    store.link_or_copy(source, target)
                    continue
                try:
                    blob = self._repo(self._blob_dir(meta["sha256"])).download_artifacts(meta["sha256"], str(tmp))
                except (MlflowException, OSError) as exc:
                    log.warning("%s is published but its file %s (blob %s) is missing from the artifact store (%s); "
                                "making it here instead", rel, name, meta["sha256"][:16], exc)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return False
                os.replace(blob, target)
                downloaded += meta["size"]
            (tmp / store.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            # never let a damaged download into the store: every downloaded file is a new inode and is hashed;
            # a file linked from this host's store keeps its inode and digest, verified when that entry was made
            store.check(tmp)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(m["size"] for m in records.values())
        log.info("fetched %s from the artifact store (%.1f MB, %.1f MB of it downloaded, the rest linked from this "
                 "host's store; digests verified)", rel, size / 1e6, downloaded / 1e6)
        return True

    def publish(self, rel: str, src: Path) -> None:
        if not rel.startswith(SHARED_STAGES):
            return
        manifest = store.read_manifest(src)
        uploaded, listed = 0, {}  # blob shard -> the blobs it holds (one listing per shard)
        with tempfile.TemporaryDirectory() as scratch:
            for name, meta in manifest.get("files", {}).items():
                sha = meta["sha256"]
                repo = self._repo(self._blob_dir(sha))
                if sha[:2] not in listed:
                    listed[sha[:2]] = {Path(f.path).name for f in repo.list_artifacts()}
                if sha in listed[sha[:2]]:
                    continue  # already there (content-addressed: the same bytes)
                named = Path(scratch) / sha  # log_artifact names the artifact after the local file
                store.link_or_copy(Path(src) / name, named)
                repo.log_artifact(str(named))
                named.unlink()
                listed[sha[:2]].add(sha)
                uploaded += meta["size"]
        self._repo(rel).log_artifact(str(Path(src) / store.MANIFEST))  # last
        log.info("published %s to the artifact store (%.1f MB uploaded; files already there by content skipped)",
                 rel, uploaded / 1e6)


def _local_files_by_digest(wanted: set[str], *, exclude: Path) -> dict[str, Path]:
    """Files of this host's shared-stage entries whose recorded digest is wanted (verified when those entries were
    made; a fetch trusts their identity as reuse does, and hashes a copy)."""
    found: dict[str, Path] = {}
    for stage in SHARED_STAGES:
        root = store.home() / stage  # entries are <stage>/<key>/ or quantized/<fmt>/<key>/
        for manifest_file in sorted([*root.glob(f"*/{store.MANIFEST}"), *root.glob(f"*/*/{store.MANIFEST}")]):
            entry = manifest_file.parent
            if entry == exclude or entry.name.startswith("."):
                continue
            for name, meta in (store.read_manifest(entry) or {}).get("files", {}).items():
                if meta["sha256"] in wanted and meta["sha256"] not in found and (entry / name).is_file():
                    found[meta["sha256"]] = entry / name
    return found


def sharing_enabled() -> bool:
    """On when runs track to a server (hosts share no disk), unless ENGINEWRIGHT_SHARE_ARTIFACTS=0; forced on with 1."""
    from registry.client import tracking_uri

    setting = settings().share_artifacts
    if setting in ("0", "false", "no", "off"):
        return False
    return setting in ("1", "true", "yes", "on") or tracking_uri().startswith(("http://", "https://"))


def enable() -> bool:
    """Make the artifact store the local store's remote for this process, when sharing is on."""
    if not sharing_enabled():
        store.set_remote(None)
        return False
    store.set_remote(MlflowArtifactShare.from_tracking())
    return True
