"""What trust costs: verifying a profile (sizes; digests with the digest cache; full SHA-256) and registering it
(upload to MLflow's artifact store as a pyfunc model), then downloading and verifying it on an empty "host".

    ENGINEWRIGHT_HOME=.enginewright python benchmarks/verify_and_upload.py [PROFILE_DIR]

Without PROFILE_DIR it takes the largest profile in the store (e.g. the demo's fp8 profile after `make demo`).
MLflow: MLFLOW_TRACKING_URI if set, else a throw-away SQLite store with a local artifact root (a copy on this disk).
Prints one JSON record: sizes, seconds, GB/s, machine.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, round(time.perf_counter() - started, 3)


def main(argv: list[str]) -> dict:
    from tasks import store

    if argv:
        profile = Path(argv[0])
    else:
        profiles = [p.parent for p in (store.home() / "profiles").rglob("manifest.json")]
        if not profiles:
            raise SystemExit(f"no profile under {store.home() / 'profiles'}: run `make demo` first or pass a directory")
        profile = max(profiles, key=lambda p: sum(m["size"] for m in store.read_manifest(p)["files"].values()))
    manifest = store.read_manifest(profile)
    size = sum(m["size"] for m in manifest["files"].values())
    record = {"profile": str(profile), "files": len(manifest["files"]), "bytes": size,
              "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()})"}
    _, record["verify_sizes_s"] = _timed(lambda: store.verify(profile, sizes_only=True))
    _, record["verify_cached_s"] = _timed(lambda: store.verify(profile))
    problems, record["verify_full_s"] = _timed(lambda: store.verify(profile, full=True))
    assert not problems, problems
    record["verify_full_gb_per_s"] = round(size / 1e9 / max(record["verify_full_s"], 1e-9), 2)

    with tempfile.TemporaryDirectory() as scratch:
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        from registry import client as registry_client
        from registry import model_registry

        run = registry_client.client().create_run(registry_client.experiment_id("trust-cost")).info.run_id
        name = f"trust-cost-{int(time.time())}"  # a new model each time: the upload is measured, not deduplicated
        (version, _), record["register_upload_s"] = _timed(lambda: model_registry.register_version(
            name=name, profile_dir=str(profile), fingerprint=manifest["content_hash"], run_id=run, tags={}))
        _, record["download_verify_s"] = _timed(lambda: model_registry.download(name, version,
                                                                          Path(scratch) / "fetched"))
        record["tracking_uri"] = registry_client.tracking_uri()
    print(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
