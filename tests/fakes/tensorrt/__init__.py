"""Fake `tensorrt` (only its version): present in TensorRT-LLM <= 1.2 containers, not a dependency from 1.3."""

import os

__version__ = os.environ.get("FAKE_TENSORRT_VERSION", "10.13.3.9")
