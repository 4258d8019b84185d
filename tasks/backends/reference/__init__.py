"""The reference backend's face: transformers + ModelOpt fake quantization, on the CPU or any CUDA GPU.

It computes what the quantized model computes (numerically), so accuracy gates are meaningful, but its speed is the
reference runtime's, not that of quantized kernels: latency results from this backend say so in their `runtime` field.
backend.py builds, evaluates and generates in process; server.py serves a profile over HTTP in its own process.
"""

import contextlib

from tasks.backends.reference.backend import (
                                              CHECKPOINT,
                                              TOOLCHAIN_KEYS,
                                              build_profile,
                                              generator,
                                              lm_eval_model,
                                              load_model,
                                              serve,
                                              session,
                                              target_runtime,
                                              toolchain_versions,
)

NAME = "reference"
RUNTIME = "reference"  # the validity rules' runtime: ModelOpt's deployment matrix decides (tasks/decisions/targets.py)
# Its speed is that of transformers running fake quantization, not of quantized kernels: measured and reported,
# but it gates and ranks nothing unless a recipe opts in (gates.latency.on_reference_runtime).
SPEED_IS_DEPLOYMENT = False
SPEED_LABEL = "reference runtime (fake quantization): not a deployment number"
CHECKPOINT_KIND = "fakequant"  # builds from quantize's fake-quant checkpoint (base weights + quantizer state)
AUTOTUNED = False
TARGET_LOCK = contextlib.nullcontext()  # in-process model compute is serialised by models.runtime.MODEL_LOCK instead

__all__ = ["AUTOTUNED", "CHECKPOINT", "CHECKPOINT_KIND", "NAME", "RUNTIME", "SPEED_IS_DEPLOYMENT", "SPEED_LABEL",
           "TARGET_LOCK", "TOOLCHAIN_KEYS", "build_profile", "generator", "lm_eval_model", "load_model", "serve",
           "session", "target_runtime", "toolchain_versions"]
