"""Fake `tensorrt` (only its version): installed with TensorRT-LLM up to 1.3.0rc20; from 1.3.0rc21 on, with the
TensorRT backend gone, TensorRT-LLM no longer depends on it (PR #16369), so it is absent as in those containers.
FAKE_TRTLLM_VERSION picks the release, as for the fake tensorrt_llm."""

import os

from packaging.version import Version

if Version(os.environ.get("FAKE_TRTLLM_VERSION", "1.3.0rc21")) >= Version("1.3.0rc21"):
    raise ModuleNotFoundError("No module named 'tensorrt' (fake: not installed with TensorRT-LLM >= 1.3.0rc21)")

__version__ = os.environ.get("FAKE_TENSORRT_VERSION", "10.13.3.9")
