"""The MLflow Model Registry at the edge: registered versions (each an MLflow pyfunc model holding the profile's
files), per-architecture aliases, promotion, resolve (what should an sm_90 node serve?) and verified download.

Tracking runs, metrics and datasets live in registry/tracking.py; the connection in registry/client.py.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from registry.anchor import FingerprintMismatch, check_fingerprint, recorded_fingerprint
from registry.client import already_exists, client, tracking_uri
from tasks import store
from tasks.base.errors import BadInput, NotCertified, Refused
from tasks.host import machine


def registered_name(registry_name: str, backend: str) -> str:
    return f"{registry_name}-{backend}"


def arch_slug(arch: str) -> str:
    """The arch as aliases spell it: sm_90 -> sm90, cpu-x86_64 -> cpu-x86-64. Versions carry it as the tag
    `arch_slug` next to `gpu_arch` (the arch as manifests spell it), so a version names its own alias."""
    return arch.replace("sm_", "sm").replace("_", "-")


def alias_for(prefix: str, arch: str, tp: int = 1) -> str:
    """Per-architecture alias, e.g. champion-sm90, champion-cpu-x86-64; tensor-parallel builds add -tp<N>."""
    return f"{prefix}-{arch_slug(arch)}" + (f"-tp{tp}" if tp > 1 else "")


def register_version(*, name: str, profile_dir: str, fingerprint: str, run_id: str, tags: dict,
                     description: str | None = None) -> tuple[str, bool]:
    """Register a passing profile as an MLflow model version whose artifacts are the profile's files (uploaded to
    the run's artifact store, so any host can fetch ``models:/NAME/VERSION``). Idempotent by artifact fingerprint,
    also across processes and hosts: a version already holding this fingerprint is returned, and when two
    registrations race, the lowest version wins and the others are deleted. Returns (version, newly_created).

    A version found already registered by a run that did not finish (killed or crashed between registration and the
    alias, then marked FAILED by cleanup) is re-certified by this run: its lineage tags (``source_run_id``,
    ``candidate_run_id``) are set to this run's, the earlier ones kept as ``first_source_run_id``/
    ``first_candidate_run_id`` (:func:`_recertify`). The version's files stay where the first run uploaded them."""
    built = store.read_manifest(Path(profile_dir))
    if built is not None and built.get("content_hash") != fingerprint:
        raise FingerprintMismatch(f"{profile_dir}: registering it with fingerprint {fingerprint}, but its manifest's "
                                  f"content_hash is {built.get('content_hash')}: a download could never be trusted")
    c = client()
    with store.lock(store.home() / "locks" / f"register-{store.key_of(name, fingerprint)[:24]}"):  # this host
        _ensure_registered_model(c, name)
        existing = _versions_with(c, name, fingerprint)
        if existing:
            _recertify(c, name, existing[0], tags)
            return existing[0], False
        all_tags = {k: str(v) for k, v in tags.items() if v is not None} | {"artifact_fingerprint": fingerprint}
        model_uri = _log_profile_model(run_id, profile_dir)
        created = mlflow.register_model(model_uri, name, tags=all_tags)
        if description:
            c.update_model_version(name, created.version, description=description)
    same = _versions_with(c, name, fingerprint)  # other hosts may have raced us
    winner = same[0] if same else str(created.version)
    for extra in same[1:]:
        if extra == str(created.version):
            c.delete_model_version(name, extra)
    return winner, winner == str(created.version)


LINEAGE_TAGS = ("source_run_id", "candidate_run_id")


def _recertify(c: MlflowClient, name: str, version: str, tags: dict) -> None:
    """Name this run in an existing version's lineage when the run that registered it did not finish: FAILED or
    KILLED (a crash after registration, before the alias), or deleted. A run that FINISHED certified it and keeps its
    name; a RUNNING one may be certifying it right now (another process) and keeps it too."""
    current = c.get_model_version(name, version).tags
    earlier, now = current.get("source_run_id"), tags.get("source_run_id")
    if not earlier or not now or str(now) == earlier:
        return
    try:
        run = c.get_run(earlier).info
        status = "DELETED" if run.lifecycle_stage == "deleted" else run.status
    except MlflowException:
        status = "DELETED"
    if status in ("FINISHED", "RUNNING", "SCHEDULED"):
        return
    for tag in LINEAGE_TAGS:
        if tags.get(tag) is None:
            continue
        if current.get(tag) and not current.get(f"first_{tag}"):
            c.set_model_version_tag(name, version, f"first_{tag}", current[tag])
        c.set_model_version_tag(name, version, tag, str(tags[tag]))
    c.set_model_version_tag(name, version, "recertified", f"run {earlier} ended {status}; certified again by {now}")


def _ensure_registered_model(c: MlflowClient, name: str) -> None:
    try:
        c.create_registered_model(name)
    except MlflowException as exc:
        if not already_exists(exc):
            raise


def _versions_with(c: MlflowClient, name: str, fingerprint: str) -> list[str]:
    found = c.search_model_versions(f"name='{name}' and tags.artifact_fingerprint='{fingerprint}'")
    return sorted((str(v.version) for v in found), key=int)


def _log_profile_model(run_id: str, profile_dir: str) -> str:
    """Upload the profile as a pyfunc model of the candidate run; returns its model URI."""
    import tempfile

    from registry import pyfunc_model

    with tempfile.TemporaryDirectory(dir=store.home()) as staging, mlflow.start_run(run_id=run_id):
        staged = Path(staging) / pyfunc_model.PROFILE  # artifacts keep their directory's name: call it "profile"
        store.link_or_copy_tree(Path(profile_dir), staged)
        info = mlflow.pyfunc.log_model(name=pyfunc_model.PROFILE, python_model=pyfunc_model.__file__,
                                       artifacts={pyfunc_model.PROFILE: str(staged)},
                                       signature=pyfunc_model.SIGNATURE,
                                       pip_requirements=[
                                           f"enginewright=={machine.version_of('enginewright') or '0.1.0'}"])
    logged = _local_dir(mlflow.get_logged_model(info.model_id).artifact_location)
    if logged is not None:
        _link_to_profile(logged / "artifacts" / pyfunc_model.PROFILE, Path(profile_dir))
    return info.model_uri


def _local_dir(uri: str | None) -> Path | None:
    """The directory an artifact URI names when the artifact store is a local directory (file:, or a plain path);
    None for a remote store (mlflow-artifacts:, s3:, gs:, ...)."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":/", ":\\")):
        path = Path(uri)
    else:
        return None
    return path if path.is_dir() else None


def _link_to_profile(copied: Path, profile_dir: Path) -> int:
    """Make a local artifact store hold the registered profile's files once: each file MLflow copied into
    `copied` is replaced (atomically: link beside, then rename over) by a hard link to the profile's own file of
    the same relative path and size, when the two are on one filesystem. Profile files are immutable and were
    verified against their digests before registration; the copy was made from the same inodes a moment ago.
    Returns the bytes freed. Another filesystem, or a file that differs, keeps its copy."""
    import os

    freed = 0
    for file in copied.rglob("*"):
        source = profile_dir / file.relative_to(copied)
        if not file.is_file() or file.is_symlink() or not source.is_file():
            continue
        a, b = file.stat(), source.stat()
        if a.st_dev != b.st_dev or a.st_size != b.st_size or (a.st_ino == b.st_ino):
            continue
        tmp = file.with_name(f".{file.name}.link-{os.getpid()}")
        try:
            os.link(source, tmp)
            os.replace(tmp, file)
        except OSError:
            tmp.unlink(missing_ok=True)
            continue
        freed += a.st_size
    return freed


def download(name: str, version: str, dest: Path, *, full: bool = True, sizes_only: bool = False) -> Path:
    """Fetch a version's files into ``dest`` (kept when it already holds them) and verify them; returns the profile
    directory. The manifest must carry the fingerprint the registry recorded for the version (FingerprintMismatch,
    exit 3, naming both), then every file must match the manifest (store.ArtifactDamaged naming each file)."""
    from registry.pyfunc_model import PROFILE

    dest = Path(dest)
    profile = dest / "artifacts" / PROFILE
    recorded = recorded_fingerprint(name, version)  # from the tracking store, before anything is fetched
    if store.read_manifest(profile) is None:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest))
    check_fingerprint(profile, recorded, what=f"{name} v{version}")
    store.check(profile, full=full, sizes_only=sizes_only)
    return profile


def promote(*, name: str, version: str, alias: str, challenger_alias: str, compare=None) -> dict:
    """Move `alias` to `version` when it beats the current champion; otherwise point `challenger_alias` at it.

    `compare(candidate_tags, champion_tags) -> (wins, why)` decides (registry/promote.py passes the recipe's ladder);
    by default the cheaper format to serve wins (tasks/decisions/serving_cost.py), then the smaller accuracy loss.
    Returns what happened.
    """
    from tasks.decisions import ladder

    compare = compare or (lambda cand, champ: ladder.compare_versions(cand, champ, strategy="first_passing",
                                                                      metric="output_tokens_per_s"))
    c = client()
    candidate = c.get_model_version(name, version)
    try:
        champion = c.get_model_version_by_alias(name, alias)
    except MlflowException:
        champion = None
    if champion is not None and str(champion.version) == str(version):
        return {"alias": alias, "action": "kept", "version": version, "previous": version}
    wins, why = (True, "no champion yet") if champion is None else compare(candidate.tags, champion.tags)
    if wins:
        c.set_registered_model_alias(name, alias, version)
        return {"alias": alias, "action": "moved", "version": version,
                "previous": None if champion is None else str(champion.version), "reason": why}
    c.set_registered_model_alias(name, challenger_alias, version)
    return {"alias": challenger_alias, "action": "challenger", "version": version, "previous": str(champion.version),
            "reason": f"champion v{champion.version} ({champion.tags.get('quant_format')}) ranks at least as well: "
                      f"{why}"}


def set_version_tags(name: str, version: str, tags: dict) -> None:
    """Tags known only once the version exists (its own `models:/` URI)."""
    c = client()
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, str(v))


def describe_model(name: str, description: str) -> None:
    """The registered model's description: what its page says first (which version serves which arch)."""
    client().update_registered_model(name, description=description)


def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model."""
    return {a: str(v) for a, v in (client().get_registered_model(name).aliases or {}).items()}


class UnknownModel(BadInput):
    """No registered model of that name."""


def resolve(*, name: str, arch: str, prefix: str = "champion", tp: int = 1, gpu_name: str | None = None) -> dict:
    """What an `arch` node should serve: the champion version of `name` for that arch, its ``models:/`` URI, the
    place of its profile in this host's store (when this host built it), and its tags.

    With `gpu_name` (a catalogue name such as H20): GPUs of one arch differ in memory and SM count, so a version
    built on that GPU is preferred to the arch's champion built on another: the champion when it was, else the
    newest certified version for this arch and tp whose `gpu_name` tag names it; the arch's champion otherwise.
    `matched` says which ("gpu_name" or "arch").

    Raises UnknownModel when `name` is not registered, NotCertified when nothing is certified for `arch`."""
    c = client()
    try:
        model = c.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in c.search_registered_models(max_results=100))
        raise UnknownModel(f"no registered model '{name}' at {tracking_uri()} "
                           f"(registered: {', '.join(known) or 'none'})") from None
    alias = alias_for(prefix, arch, tp)
    if alias not in model.aliases:
        have = ", ".join(sorted(model.aliases)) or "none"
        raise NotCertified(f"registered model '{name}' has no '{alias}' alias: nothing is certified for {arch}"
                          f"{f' with tp={tp}' if tp > 1 else ''} (its aliases: {have})")
    version = champion = c.get_model_version(name, model.aliases[alias])
    matched = "arch"
    if gpu_name is not None:
        from tasks.decisions.targets import gpu_matches

        if gpu_matches(gpu_name, version.tags.get("gpu_name")):
            matched = "gpu_name"
        else:
            same_gpu = [v for v in c.search_model_versions(f"name='{name}' and tags.gpu_arch='{arch}'")
                        if gpu_matches(gpu_name, v.tags.get("gpu_name")) and str(v.tags.get("tp_size", 1)) == str(tp)]
            if same_gpu:
                version, matched = max(same_gpu, key=lambda v: int(v.version)), "gpu_name"
    local = version.tags.get("profile_path")  # this host's build, only if it is the very artifact registered
    try:
        if local:
            check_fingerprint(Path(local), version.tags.get("artifact_fingerprint"), what="")
    except Refused:
        local = None
    return {"name": name, "version": str(version.version), "alias": alias, "matched": matched,
            "model_uri": f"models:/{name}@{alias}" if version is champion else f"models:/{name}/{version.version}",
            "version_uri": f"models:/{name}/{version.version}",
            "source": version.source, "local_profile": local,
            "tags": dict(version.tags), "run_id": version.run_id}


def find_versions(filter_string: str) -> list[dict]:
    return [{"name": v.name, "version": str(v.version), "source": v.source, "tags": dict(v.tags)}
            for v in client().search_model_versions(filter_string)]
