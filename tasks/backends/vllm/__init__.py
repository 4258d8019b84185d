"""The vllm backend's face: vLLM serving ModelOpt's unified checkpoints, in its own environment.

common.py is the package's shared bottom; build.py, server.py and eval.py import it. Profiles hold the quantized
checkpoint (hard-linked), `engine_args.yaml` (vLLM's engine arguments as data, with its release) and `engine.json`
(what the engine reported at build: the quantization method it chose, kernels, KV-cache capacity).
"""

import threading

from tasks.backends.vllm.build import build_profile
from tasks.backends.vllm.common import CHECKPOINT, BackendUnavailable, VllmError, target_runtime, toolchain_versions
from tasks.backends.vllm.eval import lm_eval_model
from tasks.backends.vllm.server import serve, session

NAME = "vllm"
RUNTIME = "vllm"  # the validity rules' runtime (tasks/decisions/targets.py)
SPEED_IS_DEPLOYMENT = True  # vLLM with the quantized kernels: what a deployment serves
SPEED_LABEL = "vLLM (deployment runtime)"
CHECKPOINT_KIND = "unified"  # builds from the quantized unified HF export (quantize's `unified/`)
AUTOTUNED = False
TARGET_LOCK = threading.Lock()  # its targets run one after another in a process: one engine at a time on the GPU
TOOLCHAIN_KEYS = ("vllm", "vllm_torch", "vllm_transformers", "modelopt")

__all__ = ["AUTOTUNED", "CHECKPOINT", "CHECKPOINT_KIND", "NAME", "RUNTIME", "SPEED_IS_DEPLOYMENT", "SPEED_LABEL",
           "TARGET_LOCK", "TOOLCHAIN_KEYS", "BackendUnavailable", "VllmError", "build_profile", "lm_eval_model",
           "serve", "session", "target_runtime", "toolchain_versions"]
