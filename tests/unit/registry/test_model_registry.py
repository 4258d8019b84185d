"""Registry behaviour against a real MLflow SQLite store (no server)."""

import pytest

from registry import anchor, model_registry
from registry import client as registry_client
from tasks import store


def _register(tmp_path, name, fmt, arch, degradation, fp):
    profile = tmp_path / fp
    profile.mkdir(exist_ok=True)
    (profile / "runtime.yaml").write_text(f"profile: {fp}\n")
    exp = registry_client.experiment_id("test")
    run = registry_client.client().create_run(exp).info.run_id
    return model_registry.register_version(name=name, profile_dir=str(profile), fingerprint=fp, run_id=run,
                                tags={"quant_format": fmt, "gpu_arch": arch, "accuracy_degradation": degradation})


def test_alias_moves_only_to_a_better_version_and_registration_is_idempotent(tmp_path):
    v1, new = _register(tmp_path, "m", "fp8", "sm_90", 0.03, "a")
    assert new
    assert model_registry.promote(name="m", version=v1, alias="champion-sm90",
                                  challenger_alias="challenger-sm90")["action"] == "moved"
    assert _register(tmp_path, "m", "fp8", "sm_90", 0.03, "a") == (v1, False)  # same artifact, same version
    v2, _ = _register(tmp_path, "m", "fp8", "sm_90", 0.05, "b")  # same format, worse accuracy
    out = model_registry.promote(name="m", version=v2, alias="champion-sm90", challenger_alias="challenger-sm90")
    assert out["action"] == "challenger" and model_registry.resolve(name="m", arch="sm_90")["version"] == v1
    v3, _ = _register(tmp_path, "m", "int4_awq", "sm_90", 0.06, "c")  # cheaper format that passed
    assert model_registry.promote(name="m", version=v3, alias="champion-sm90",
                                  challenger_alias="challenger-sm90")["action"] == "moved"
    assert model_registry.resolve(name="m", arch="sm_90")["version"] == v3


def test_resolve_answers_per_architecture(tmp_path):
    for arch, fp in (("sm_90", "h"), ("sm_80", "a"), ("sm_100", "b")):
        v, _ = _register(tmp_path, "multi", "fp8" if arch != "sm_80" else "int4_awq", arch, 0.01, fp)
        model_registry.promote(name="multi", version=v, alias=model_registry.alias_for("champion", arch),
                               challenger_alias="x")
    answers = {arch: model_registry.resolve(name="multi", arch=arch) for arch in ("sm_90", "sm_80", "sm_100")}
    assert [a["tags"]["gpu_arch"] for a in answers.values()] == ["sm_90", "sm_80", "sm_100"]
    assert (answers["sm_80"]["version_uri"] == "models:/multi/2"
            and answers["sm_80"]["model_uri"] == "models:/multi@champion-sm80")
    with pytest.raises(LookupError, match="nothing is certified for sm_89"):
        model_registry.resolve(name="multi", arch="sm_89")
    found = model_registry.find_versions("name='multi' and tags.gpu_arch LIKE 'sm_1%'")
    assert [f["tags"]["gpu_arch"] for f in found] == ["sm_100"]


def test_resolve_command_answers_for_a_gpu_name(tmp_path):
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    v, _ = _register(tmp_path, "cli-model", "fp8", "sm_90", 0.01, "h")
    model_registry.promote(name="cli-model", version=v, alias="champion-sm90", challenger_alias="challenger-sm90")
    runner = CliRunner()
    result = runner.invoke(app, ["resolve", "cli-model", "--gpu", "H100"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output[result.output.index("{"):])
    assert answer["alias"] == "champion-sm90" and answer["tags"]["gpu_arch"] == "sm_90"
    missing = runner.invoke(app, ["resolve", "cli-model", "--gpu", "A100"])
    assert missing.exit_code == 4 and "champion-sm80" in missing.output
    refused = runner.invoke(app, ["resolve", "cli-model", "--gpu", "H100", "--verify"])
    assert refused.exit_code == 3 and "no manifest.json" in refused.output  # registered dir is not a complete profile


def test_resolve_by_gpu_name_prefers_a_version_built_on_that_gpu(tmp_path):
    """H100 and H20 are both sm_90 but differ in memory and SM count: --gpu H20 prefers an H20-built version."""
    import json

    from typer.testing import CliRunner

    from flows.cli import app

    def register(fp, gpu, fmt="fp8", degradation=0.01):
        profile = tmp_path / fp
        profile.mkdir()
        (profile / "runtime.yaml").write_text(f"profile: {fp}\n")
        run = registry_client.client().create_run(registry_client.experiment_id("test")).info.run_id
        return model_registry.register_version(name="fleet", profile_dir=str(profile), fingerprint=fp, run_id=run,
                                    tags={"quant_format": fmt, "gpu_arch": "sm_90", "gpu_name": gpu, "tp_size": 1,
                                          "accuracy_degradation": degradation})[0]

    h100 = register("h100", "NVIDIA H100 80GB HBM3", "int4_awq")
    model_registry.promote(name="fleet", version=h100, alias="champion-sm90", challenger_alias="challenger-sm90")
    h20 = register("h20", "NVIDIA H20")
    assert model_registry.promote(name="fleet", version=h20, alias="champion-sm90",
                       challenger_alias="challenger-sm90")["action"] == "challenger"
    register("h200", "NVIDIA H200", degradation=0.02)

    assert model_registry.resolve(name="fleet", arch="sm_90")["version"] == h100  # arch-level: the champion
    by_h20 = model_registry.resolve(name="fleet", arch="sm_90", gpu_name="H20")
    assert (by_h20["version"], by_h20["matched"]) == (h20, "gpu_name")
    assert model_registry.resolve(name="fleet", arch="sm_90", gpu_name="H100")["matched"] == "gpu_name"
    # nothing built on one: the arch's champion
    gh200 = model_registry.resolve(name="fleet", arch="sm_90", gpu_name="GH200")
    assert (gh200["version"], gh200["matched"]) == (h100, "arch")

    result = CliRunner().invoke(app, ["resolve", "fleet", "--gpu", "H20"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output[result.output.index("{"):])
    assert answer["version"] == h20 and answer["tags"]["gpu_name"] == "NVIDIA H20"
    answer = json.loads((r := CliRunner().invoke(app, ["resolve", "fleet", "--gpu", "sm_90"])).output[
        r.output.index("{"):])
    assert answer["version"] == h100 and answer["matched"] == "arch"


def test_a_registered_version_holds_the_files_and_a_tampered_download_is_refused(tmp_path):
    """The version's files live in MLflow's artifact store: a download verifies them; one flipped byte is named."""
    import json

    from typer.testing import CliRunner

    from flows.cli import app
    from tasks import store

    profile = tmp_path / "built"
    with store.atomic_dir(profile) as tmp:
        (tmp / "checkpoint").mkdir()
        (tmp / "checkpoint" / "model.safetensors").write_bytes(bytes(range(256)) * 8)
        store.write_manifest(tmp, {"key": "k", "backend": "reference"})
    run = registry_client.client().create_run(registry_client.experiment_id("test")).info.run_id
    fingerprint = store.read_manifest(profile)["content_hash"]
    v, _ = model_registry.register_version(name="held", profile_dir=str(profile), fingerprint=fingerprint, run_id=run,
                                tags={"quant_format": "fp8", "gpu_arch": "sm_90"}, description="what was certified")
    model_registry.promote(name="held", version=v, alias="champion-sm90", challenger_alias="challenger-sm90")
    assert registry_client.client().get_model_version("held", v).description == "what was certified"
    runner = CliRunner()
    dest = tmp_path / "fetched"
    ok = runner.invoke(app, ["resolve", "held", "--gpu", "H100", "--download", str(dest)])
    assert ok.exit_code == 0, ok.output
    answer = json.loads(ok.stdout[ok.stdout.index("{"):])
    weights = dest / "artifacts" / "profile" / "checkpoint" / "model.safetensors"
    assert answer["profile_dir"] == str(weights.parents[1]) and answer["files_checked"] == "sha256"
    assert weights.read_bytes() == (profile / "checkpoint" / "model.safetensors").read_bytes()
    data = bytearray(weights.read_bytes())
    data[100] ^= 1
    weights.write_bytes(bytes(data))
    refused = runner.invoke(app, ["resolve", "held", "--gpu", "H100", "--download", str(dest)])
    assert refused.exit_code == 3 and "checkpoint/model.safetensors: sha256" in refused.output
    fast = runner.invoke(app, ["resolve", "held", "--gpu", "H100", "--download", str(dest), "--fast"])
    assert fast.exit_code == 0 and json.loads(fast.stdout[fast.stdout.index("{"):])["files_checked"] == "sizes"
    weights.unlink()
    gone = runner.invoke(app, ["resolve", "held", "--gpu", "H100", "--download", str(dest), "--fast"])
    assert gone.exit_code == 3 and "checkpoint/model.safetensors: missing" in gone.output


def _champion_with_a_profile(tmp_path, name="anchored"):
    from tasks import store

    profile = tmp_path / "built"
    with store.atomic_dir(profile) as tmp:
        (tmp / "checkpoint").mkdir()
        (tmp / "checkpoint" / "model.safetensors").write_bytes(bytes(range(256)) * 8)
        store.write_manifest(tmp, {"key": "k", "backend": "reference"})
    fingerprint = store.read_manifest(profile)["content_hash"]
    run = registry_client.client().create_run(registry_client.experiment_id("test")).info.run_id
    v, _ = model_registry.register_version(name=name, profile_dir=str(profile), fingerprint=fingerprint, run_id=run,
                                           tags={"quant_format": "fp8", "gpu_arch": "sm_90"})
    model_registry.promote(name=name, version=v, alias="champion-sm90", challenger_alias="challenger-sm90")
    return v, fingerprint


def _rewrite_in_the_artifact_store(home, *, rehash: bool = True) -> str:
    """What an attacker with write access to the artifact store does: flip a byte of the champion's checkpoint and
    write its new sha256 (and, with rehash, the new content hash) into the manifest that travels with it."""
    import hashlib
    import json

    from tasks import store

    [weights] = (home / "mlartifacts").rglob("artifacts/profile/checkpoint/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[7] ^= 0xFF
    weights.write_bytes(bytes(data))
    manifest_file = weights.parents[1] / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["files"]["checkpoint/model.safetensors"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    if rehash:
        manifest["content_hash"] = store.fingerprint_of(manifest)
    manifest_file.write_text(json.dumps(manifest))
    return manifest["content_hash"]


def test_a_rewritten_artifact_store_copy_is_refused_by_download_resolve_and_pyfunc_load(tmp_path, isolated_home):
    """The registry (tracking store) is the trust anchor: a checkpoint and manifest rewritten consistently in the
    artifact store pass the manifest's own digests but not the version's artifact_fingerprint tag."""
    import mlflow.pyfunc
    from typer.testing import CliRunner

    from flows.cli import app

    v, recorded = _champion_with_a_profile(tmp_path)
    assert model_registry.download("anchored", v, tmp_path / "before").is_dir()  # intact: trusted
    assert anchor.fingerprint_of_logged_model(tmp_path / "before") == (f"anchored v{v}", recorded)
    served = _rewrite_in_the_artifact_store(isolated_home)
    assert served != recorded

    with pytest.raises(model_registry.FingerprintMismatch) as refused:
        model_registry.download("anchored", v, tmp_path / "after")
    assert recorded in str(refused.value) and served in str(refused.value)
    out = CliRunner().invoke(app, ["resolve", "anchored", "--gpu", "H100", "--verify"])
    assert out.exit_code == 3, out.output
    assert recorded in out.output and served in out.output
    out = CliRunner().invoke(app, ["resolve", "anchored", "--gpu", "H100", "--download", str(tmp_path / "d")])
    assert out.exit_code == 3 and "artifact_fingerprint" in out.output
    with pytest.raises(model_registry.FingerprintMismatch, match=recorded):
        mlflow.pyfunc.load_model("models:/anchored@champion-sm90", suppress_warnings=True)


def test_edited_digests_under_an_unchanged_content_hash_are_refused_too(tmp_path, isolated_home):
    v, recorded = _champion_with_a_profile(tmp_path, name="halfdone")
    assert _rewrite_in_the_artifact_store(isolated_home, rehash=False) == recorded
    with pytest.raises(model_registry.FingerprintMismatch, match="file records hash to"):
        model_registry.download("halfdone", v, tmp_path / "after")
def test_registration_into_a_local_artifact_store_holds_the_profile_once(tmp_path):
    """The version's files in a local artifact store are hard links to the profile's own (no second copy), and the
    version still downloads and verifies from them."""
    import os

    profile = tmp_path / "p-once"
    (profile / "checkpoint").mkdir(parents=True)
    (profile / "checkpoint" / "model.safetensors").write_bytes(os.urandom(1 << 20))
    (profile / "runtime.yaml").write_text("profile: once\n")
    fingerprint = store.write_manifest(profile, {"stage": "build"})["content_hash"]
    run = registry_client.client().create_run(registry_client.experiment_id("test")).info.run_id
    version, _ = model_registry.register_version(name="once", profile_dir=str(profile), fingerprint=fingerprint,
                                                 run_id=run, tags={"quant_format": "fp8", "gpu_arch": "sm_90"})
    stored = [p for p in (store.home() / "mlartifacts").rglob("model.safetensors")]
    assert len(stored) == 1
    assert stored[0].stat().st_ino == (profile / "checkpoint" / "model.safetensors").stat().st_ino
    assert (profile / "checkpoint" / "model.safetensors").stat().st_nlink == 2
    got = model_registry.download("once", version, tmp_path / "fetched")
    assert (got / "checkpoint" / "model.safetensors").read_bytes() == (
        profile / "checkpoint" / "model.safetensors").read_bytes()


def test_a_remote_artifact_store_is_not_linked():
    assert model_registry._local_dir("mlflow-artifacts:/1/models/m-1/artifacts") is None
    assert model_registry._local_dir("s3://bucket/x") is None


def test_a_version_left_by_a_killed_run_names_the_run_that_certified_it_again(tmp_path):
    c = registry_client.client()
    exp = registry_client.experiment_id("test")
    profile = tmp_path / "p"
    profile.mkdir()
    (profile / "runtime.yaml").write_text("profile: p\n")

    def certify():
        pipeline, candidate = c.create_run(exp).info.run_id, c.create_run(exp).info.run_id
        version, _ = model_registry.register_version(
            name="m", profile_dir=str(profile), fingerprint="fp", run_id=candidate,
            tags={"quant_format": "fp8", "gpu_arch": "sm_90", "source_run_id": pipeline,
                  "candidate_run_id": candidate})
        return version, pipeline, candidate

    v, killed, killed_candidate = certify()  # registered, then killed before the alias: cleanup marks it FAILED
    c.set_terminated(killed, status="FAILED")
    v_again, rerun, rerun_candidate = certify()
    assert v_again == v
    assert model_registry.promote(name="m", version=v, alias="champion-sm90",
                                  challenger_alias="challenger-sm90")["action"] == "moved"
    champion = model_registry.resolve(name="m", arch="sm_90")["tags"]
    assert champion["source_run_id"] == rerun and champion["candidate_run_id"] == rerun_candidate
    assert champion["first_source_run_id"] == killed and champion["first_candidate_run_id"] == killed_candidate
    assert killed in champion["recertified"] and "FAILED" in champion["recertified"]

    c.set_terminated(rerun, status="FINISHED")  # a run that finished certified it: a third run does not take over
    assert certify()[0] == v
    tags = model_registry.resolve(name="m", arch="sm_90")["tags"]
    assert tags["source_run_id"] == rerun and tags["first_source_run_id"] == killed
