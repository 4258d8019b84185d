"""This machine: the device a process would run on and the toolchain installed (recorded in every manifest)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


TOOLCHAIN_DISTS = {
    "torch": "torch",
    "transformers": "transformers",
    "modelopt": "nvidia-modelopt",
    "lm_eval": "lm_eval",
    "tensorrt_llm": "tensorrt_llm",
    "tensorrt": "tensorrt",
}


def toolchain() -> dict[str, str | None]:
    return {name: version_of(dist) for name, dist in TOOLCHAIN_DISTS.items()} | {"python": platform.python_version()}


def local_device() -> dict[str, Any]:
    """What this process would run on: ``sm_XY`` with GPU facts when CUDA is available, else ``cpu-<machine>``."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        props = torch.cuda.get_device_properties(0)
        return {
            "arch": f"sm_{major}{minor}",
            "device": "cuda",
            "gpu_name": torch.cuda.get_device_name(0),
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "driver": _nvidia_driver(),
        }
    return {
        "arch": f"cpu-{platform.machine()}",
        "device": "cpu",
        "gpu_name": None,
        "gpu_count": 0,
        "cpu": platform.processor() or platform.machine(),
        "cuda": None,
        "driver": None,
    }


def _nvidia_driver() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
            return version.decode() if isinstance(version, bytes) else version
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - nvml missing or no driver: the manifest says unknown rather than guessing
        return None
