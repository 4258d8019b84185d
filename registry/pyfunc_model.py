"""A certified profile as an MLflow model: `mlflow.pyfunc.load_model("models:/NAME@champion-sm90")` loads it.

The profile's files travel as the model's artifacts (``artifacts/profile/``) in MLflow's artifact store, so any host
can fetch them by the version's ``models:/`` URI. Loading first compares the profile manifest's fingerprint with the
version's `artifact_fingerprint` tag in the tracking store (refused, naming both, when they differ), then verifies
every file against the profile's manifest and refuses another architecture or toolchain before a single weight is
read; ``predict`` generates with the profile's backend (the reference backend on CPU or CUDA; TensorRT-LLM profiles
are served with trtllm-serve).
"""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

PROFILE = "profile"  # the artifact name: <model>/artifacts/profile/ holds the profile's files and manifest
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                           params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]))


class CertifiedProfile(mlflow.pyfunc.PythonModel):
    """Prompts in, greedy completions out, computed by the certified profile itself."""

    def load_context(self, context) -> None:
        from registry.anchor import check_fingerprint, fingerprint_of_logged_model
        from tasks.backends import get as backend
        from tasks.profiles.profile import verify_artifact

        profile = Path(context.artifacts[PROFILE])
        # The registry is the trust anchor: the version's fingerprint comes from the tracking store (found by the
        # run and logged model this model directory names), not from anything in the artifact store.
        version, recorded = fingerprint_of_logged_model(profile.parents[1])
        check_fingerprint(profile, recorded, what=version)
        manifest = verify_artifact(profile)  # digests, architecture, toolchain: refused with what differs
        impl = backend(manifest["backend"])
        if not hasattr(impl, "generator"):
            raise RuntimeError(f"{manifest['backend']} profiles are served by their runtime's server, not in-process "
                               f"through pyfunc: serve {profile} with its backend (see README, 'Serving')")
        self._generate = impl.generator(profile)

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        return self._generate(prompts(model_input), int((params or {}).get("max_new_tokens", 32)))


mlflow.models.set_model(CertifiedProfile())  # logged as code (this file), not as a pickled object


def prompts(model_input) -> list[str]:
    """A list of strings from what pyfunc hands over: a DataFrame (first column), a list, an array or one string."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "iloc"):  # pandas DataFrame/Series
        column = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        return [str(v) for v in column.tolist()]
    return [str(v) for v in list(model_input)]
