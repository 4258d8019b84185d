"""The registry as trust anchor: what was registered is what the tracking store records (each version's
`artifact_fingerprint` tag), never what the artifact store holds now. Every download, `resolve --verify`/`--download`
and pyfunc load compares the fetched manifest's fingerprint with that tag before any file is trusted (README
"Reliability"). Imports only registry.client and the store, so registry.model_registry and registry.pyfunc_model can
both use it.
"""

from __future__ import annotations

from pathlib import Path

from registry.client import client
from tasks import store
from tasks.base.errors import Refused

__all__ = ["FingerprintMismatch", "check_fingerprint", "fingerprint_of_logged_model", "recorded_fingerprint"]


class FingerprintMismatch(Refused):
    """A fetched artifact is not the one the registry recorded: its manifest's fingerprint differs from the version's
    `artifact_fingerprint` tag (kept in the tracking store, not the artifact store). Exit 3."""


def recorded_fingerprint(name: str, version: str) -> str | None:
    """The version's `artifact_fingerprint` tag, read from the tracking store (the trust anchor)."""
    return client().get_model_version(name, str(version)).tags.get("artifact_fingerprint")


def check_fingerprint(profile: Path, recorded: str | None, *, what: str) -> dict:
    """The manifest of ``profile`` when it is the artifact the registry recorded for `what` (e.g. ``m v3``): its
    ``content_hash`` and the fingerprint its own file records imply must both equal `recorded`. Cheap (reads the
    manifest only) and run before any file is trusted; the file digests are checked against the manifest after.

    Raises FingerprintMismatch naming both fingerprints, store.ArtifactDamaged when there is no manifest."""
    profile = Path(profile)
    manifest = store.read_manifest(profile)
    if manifest is None:
        raise store.ArtifactDamaged(f"{profile}: no {store.MANIFEST}; not a complete artifact")
    if not recorded:
        raise FingerprintMismatch(f"{what} has no artifact_fingerprint tag in the tracking store: nothing to check "
                                  f"{profile} against, so it is not trusted")
    claimed, implied = manifest.get("content_hash"), store.fingerprint_of(manifest)
    if claimed != recorded or implied != recorded:
        detail = (f"its manifest's content_hash is {claimed}" if claimed == implied else
                  f"its manifest claims content_hash {claimed} but its file records hash to {implied}")
        raise FingerprintMismatch(
            f"refused: {profile} is not the artifact registered as {what}: the registry (tracking store) records "
            f"artifact_fingerprint {recorded}, {detail}. The artifact store's copy was changed after registration; "
            "nothing from it is used.")
    return manifest


def fingerprint_of_logged_model(model_dir: Path) -> tuple[str, str | None]:
    """For a downloaded pyfunc model directory: (which registered version it is, that version's recorded
    `artifact_fingerprint`), asked of the tracking store. MLflow 3.17 hands `load_context` no model URI, only local
    paths, so the version is found by what the model's MLmodel names (its run id and logged-model id) and then read
    from the registry: the fingerprint compared is the tracking store's, never the artifact store's. Raises
    FingerprintMismatch when no registered version is that logged model."""
    from mlflow.models import Model

    meta = Model.load(str(Path(model_dir) / "MLmodel"))
    run_id, model_id = meta.run_id, getattr(meta, "model_id", None)
    versions = [v for v in client().search_model_versions(f"run_id='{run_id}'")
                if model_id is None or v.model_id in (None, model_id)] if run_id else []
    if not versions:
        raise FingerprintMismatch(f"{model_dir}: no registered model version is the logged model it names (run "
                                  f"{run_id}, model {model_id}): it is not a certified artifact, so it is not loaded")
    prints = {v.tags.get("artifact_fingerprint") for v in versions}
    if len(prints) != 1:  # one logged model is one profile; two fingerprints would mean a tampered tracking store
        raise FingerprintMismatch(f"{model_dir}: the versions of logged model {model_id} record different "
                                  f"fingerprints {sorted(map(str, prints))}: refusing to choose")
    v = versions[0]
    return f"{v.name} v{v.version}", prints.pop()
