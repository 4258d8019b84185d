"""Stage outputs shared between hosts through MLflow's artifact store (the one place artifacts live between hosts).

A stage output ``<stage>/<key>/`` made on one host is published under ``<artifact root of the enginewright-store
experiment>/store/<stage>/<key>/``: every file first, the manifest last, so a reader that finds the manifest finds
every file. Another host fetches it by the same content key into its local store (a cache of this one), verifying
every digest before the directory appears. Works wherever MLflow's artifact repositories do: a local
``mlartifacts`` directory, the tracking server's artifact proxy (``mlflow-artifacts:``), S3/GCS behind it.
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

log = logging.getLogger(__name__)

EXPERIMENT = "enginewright-store"
# What another host needs: the imported model, the calibration set, the quantized checkpoints. Profiles are built
# on their target's host and reach other hosts through the registry; evaluation results are small and per host.
SHARED_STAGES = ("models/", "calibration/", "quantized/")


class MlflowArtifactShare(store.Remote):
    def __init__(self, root: str):
        self.root = root.rstrip("/")

    @classmethod
    def from_tracking(cls) -> "MlflowArtifactShare":
        from registry.mlflow_registry import client, experiment_id

        return cls(client().get_experiment(experiment_id(EXPERIMENT)).artifact_location.rstrip("/") + "/store")

    def _repo(self, rel: str):
        return get_artifact_repository(f"{self.root}/{rel}")

    def fetch(self, rel: str, dest: Path) -> bool:
        if not rel.startswith(SHARED_STAGES):
            return False
        repo = self._repo(rel)
        with tempfile.TemporaryDirectory() as scratch:
            try:
                manifest_file = repo.download_artifacts(store.MANIFEST, scratch)
            except (MlflowException, OSError):
                return False  # not published (yet)
            manifest = json.loads(Path(manifest_file).read_text())
        tmp = store.temporary_sibling(dest)
        tmp.mkdir(parents=True)
        try:
            for name in manifest.get("files", {}):
                repo.download_artifacts(name, str(tmp))
            (tmp / store.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
            store.check(tmp, full=True)  # never let a damaged download into the store
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(m["size"] for m in manifest.get("files", {}).values())
        log.info("fetched %s from the artifact store (%.1f MB, digests verified)", rel, size / 1e6)
        return True

    def publish(self, rel: str, src: Path) -> None:
        if not rel.startswith(SHARED_STAGES):
            return
        repo = self._repo(rel)
        manifest = store.read_manifest(src)
        for name in manifest.get("files", {}):
            parent = Path(name).parent.as_posix()
            repo.log_artifact(str(Path(src) / name), None if parent == "." else parent)
        repo.log_artifact(str(Path(src) / store.MANIFEST))  # last
        log.info("published %s to the artifact store", rel)


def sharing_enabled() -> bool:
    """On when runs track to a server (hosts share no disk), unless ENGINEWRIGHT_SHARE_ARTIFACTS=0; forced on with 1."""
    from registry.mlflow_registry import tracking_uri

    setting = os.environ.get("ENGINEWRIGHT_SHARE_ARTIFACTS", "auto").lower()
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
