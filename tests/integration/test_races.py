"""Races: many processes registering one artifact, two runs of one recipe on one state dir at once."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

REGISTER = """
import json, os, sys, time
from pathlib import Path
start = Path(sys.argv[1])
from registry import client as registry_client
from registry import model_registry
run = registry_client.client().create_run(registry_client.experiment_id("races")).info.run_id
while not start.exists():
    time.sleep(0.01)
fingerprint = json.loads((Path(sys.argv[2]) / "manifest.json").read_text())["content_hash"]
version, created = model_registry.register_version(name="raced", profile_dir=sys.argv[2], fingerprint=fingerprint,
                                                   run_id=run, tags={"quant_format": "fp8"})
print(json.dumps({"version": version, "created": created}))
"""


def _profile(path: Path) -> Path:
    from tasks import store

    with store.atomic_dir(path) as tmp:
        (tmp / "weights.bin").write_bytes(os.urandom(256))
        store.write_manifest(tmp, {"stage": "build", "key": "k"})
    return path


@pytest.mark.parametrize("hosts", [1, 20], ids=["one-host", "twenty-hosts"])
def test_twenty_concurrent_registrations_of_one_fingerprint_make_one_version(tmp_path, hosts):
    """20 processes at once; with one host they share the store's lock, with twenty (a home each, no lock in
    common) they race in the registry itself and converge on the lowest version."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    profile = _profile(tmp_path / "profile")
    start = tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", "from registry import client as r; r.client()"], env=env | {
        "ENGINEWRIGHT_HOME": str(tmp_path / "h0")}, check=True, cwd=ROOT)  # schema created once, before the race
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER, str(start), str(profile)], cwd=ROOT,
                              env=env | {"ENGINEWRIGHT_HOME": str(tmp_path / f"h{i % hosts}")},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(20)]
    time.sleep(8)  # every process imported mlflow and waits at the start line
    start.touch()
    answers = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        answers.append(json.loads(out.strip().splitlines()[-1]))
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    try:
        from registry import model_registry

        versions = model_registry.find_versions("name='raced'")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert len(versions) == 1, versions
    assert {a["version"] for a in answers} == {versions[0]["version"]}


def test_two_runs_of_one_recipe_on_one_state_dir_both_finish_with_one_profile_per_key(tiny_model_dir, tiny_recipe,
                                                                                      tmp_path):
    path = tiny_recipe("twins", tiny_model_dir)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {"ENGINEWRIGHT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--json-out",
                               str(tmp_path / f"run{i}.json")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-5000:]
    results = [json.loads((tmp_path / f"run{i}.json").read_text()) for i in range(2)]
    assert all(r["promotions"] for r in results)
    profiles = [p for p in (home / "profiles" / "tiny").glob("*/*/*") if p.is_dir() and not p.name.startswith(".")]
    keys = [json.loads((p / "manifest.json").read_text())["key"] for p in profiles]
    assert len(keys) == len(set(keys)) == 2  # the baseline and fp8: one profile per key, each intact
    from tasks import store

    assert all(store.verify(p, full=True) == [] for p in profiles)
    assert not list(home.rglob(".*.tmp-*"))
    versions = {(p["registered_model"], p["version"]) for r in results for p in r["promotions"]}
    assert len(versions) == 1
