"""Backends: one package per serving runtime, each declaring what it is through one contract, registered here.

A backend is ``tasks/backends/<name>/`` whose face (``__init__``) exports the names of :class:`Backend`; this
module is the only place that maps a recipe's ``targets[].backend`` to a package. Nothing outside tasks/backends/
compares a backend name: it asks the backend (``get(name).SPEED_IS_DEPLOYMENT``, :func:`target_runtime`,
:func:`checkpoint_for`). A new backend is a package, one line in ``BACKENDS``, its validity rules (keyed by the
``RUNTIME`` it declares, in tasks/decisions/targets.py) and its target type in recipes/schema.py.
"""

from __future__ import annotations

import importlib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from tasks.decisions.targets import TargetRuntime
from tasks.quantization.quantize import TRTLLM_CHECKPOINT_FORMATS, trtllm_checkpoint_dir

BACKENDS = {"reference": "tasks.backends.reference", "trtllm": "tasks.backends.trtllm", "vllm": "tasks.backends.vllm"}


class Backend(Protocol):
    """What a backend package's face exports (duck-typed: each face is a module)."""

    NAME: str
    SPEED_IS_DEPLOYMENT: bool  # its latency numbers are a deployment runtime's: latency gates may decide
    SPEED_LABEL: str  # says which runtime produced a latency number, wherever it is shown
    CHECKPOINT: str  # the profile's sub-directory holding the checkpoint (and tokenizer)
    CHECKPOINT_KIND: str  # "fakequant" (quantize's fake-quant checkpoint) or "unified" (the unified HF export)
    AUTOTUNED: bool  # its profiles hold kernels tuned on the GPU that built them
    TOOLCHAIN_KEYS: tuple[str, ...]  # versions that pin a profile
    TARGET_LOCK: AbstractContextManager  # held around one target's certification (vllm: one at a time)

    def toolchain_versions(self) -> dict[str, str | None]: ...
    def target_runtime(self, target) -> TargetRuntime: ...
    def build_profile(self, *, checkpoint_dir: str, target, device: dict, out: Path) -> dict: ...
    def lm_eval_model(self, profile_dir: Path, *, batch_size: int, max_length: int) -> AbstractContextManager: ...
    def serve(self, profile_dir: Path, *, host: str = ..., port: int, log_file: Path) -> AbstractContextManager: ...
    def session(self, profile_dir: Path) -> AbstractContextManager:
        """Around one profile's validation: what its stages share (vllm: one engine for accuracy and latency)."""


def get(name: str) -> Backend:
    """The backend package registered under `name`."""
    if name not in BACKENDS:
        raise KeyError(f"unknown backend '{name}' (known: {', '.join(sorted(BACKENDS))})")
    return importlib.import_module(BACKENDS[name])


def code_dir(name: str) -> Path:
    """The backend's package directory: a profile's build key hashes all of it (it builds, evaluates and serves)."""
    return Path(get(name).__file__).parent


def target_runtime(target) -> TargetRuntime:
    """The runtime facts of a recipe target, as its backend declares them (what the validity rules are keyed by)."""
    return get(target.backend).target_runtime(target)


def checkpoint_for(q, target) -> str:
    """The checkpoint a target builds from: quantize's fake-quant model, a TensorRT-LLM checkpoint for the target's
    tp (INT8-SQ, legacy engine), or the unified HF export."""
    if get(target.backend).CHECKPOINT_KIND == "fakequant":
        return q.fakequant_dir
    if q.format in TRTLLM_CHECKPOINT_FORMATS and target_runtime(target).checkpoint_per_tp:
        return str(trtllm_checkpoint_dir(q.path, target.tp))
    return q.unified_dir


def checkpoint_tps(targets) -> tuple[int, ...]:
    """The tensor-parallel sizes of targets that build from a per-tp TensorRT-LLM checkpoint (legacy engines)."""
    return tuple(sorted({t.tp for t in targets if target_runtime(t).checkpoint_per_tp}))
