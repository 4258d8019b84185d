"""The trtllm backend's face: what it is (the contract in tasks/backends/__init__.py) and its three operations.

common.py is the package's shared bottom; build.py, eval.py and serve.py each import it and nothing above it.
Nothing here has run against a real TensorRT-LLM: tests/unit/backends/test_trtllm_*.py check the calls, names and
files against a fake `tensorrt_llm` (tests/fakes).
"""

import contextlib

from tasks.backends.trtllm.build import build_profile
from tasks.backends.trtllm.common import CHECKPOINT, TrtllmError, target_runtime, toolchain_versions
from tasks.backends.trtllm.eval import lm_eval_model
from tasks.backends.trtllm.server import serve

NAME = "trtllm"
RUNTIME = "trtllm"  # the validity rules' runtime (tasks/decisions/targets.py)
SPEED_IS_DEPLOYMENT = True  # trtllm-serve with the quantized kernels: what a deployment serves
SPEED_LABEL = "TensorRT-LLM (deployment runtime)"
CHECKPOINT_KIND = "unified"  # builds from the quantized unified HF export (quantize's `export/`)
AUTOTUNED = True  # its profiles carry kernels autotuned on the GPU that built them
TARGET_LOCK = contextlib.nullcontext()  # each target runs on its own pool's workers
# Versions that pin a profile; `tensorrt` is recorded only where it is installed (TensorRT-LLM >= 1.3 dropped it).
TOOLCHAIN_KEYS = ("tensorrt_llm", "tensorrt", "modelopt", "torch", "transformers")



def session(profile_dir) -> contextlib.AbstractContextManager:
    """Nothing is shared between the stages: lm-eval loads the profile in process, trtllm-serve serves latency."""
    return contextlib.nullcontext()


__all__ = ["AUTOTUNED", "CHECKPOINT", "CHECKPOINT_KIND", "NAME", "RUNTIME", "SPEED_IS_DEPLOYMENT", "SPEED_LABEL",
           "TARGET_LOCK", "TOOLCHAIN_KEYS", "TrtllmError", "build_profile", "lm_eval_model", "serve", "session",
           "target_runtime", "toolchain_versions"]
