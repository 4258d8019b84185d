"""What the trtllm backend's build, evaluation and serving share: file names, options, TensorRT-LLM's import,
the profile's kind, and the autotuner cache (the bottom of the package; it imports nothing of it)."""


from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from tasks.decisions.targets import DEFAULT_TRTLLM_VERSION, TargetRuntime
from tasks.host import machine

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
OPTIONS_FILE = "extra_llm_api_options.yaml"
ENGINE = "engine"
AUTOTUNER = "autotuner"
AUTOTUNER_FILE = "autotuner_cache.json"
RUNTIME_PYTORCH = "pytorch"
RUNTIME_LEGACY = "legacy-engine"
# TensorRT-LLM's PyTorch model engine reads this variable in its autotuner warm-up and runs
# `autotune(cache_path=...)`, which loads the file when present and saves the tuned tactics to it on exit
# (tensorrt_llm/_torch/pyexecutor/model_engine.py, tensorrt_llm/_torch/autotuner.py). Newer releases write one JSON
# file ({"metadata", "rank_<r>"}); older ones `<stem>.rank<r>.json` files: the profile keeps whatever was written.
AUTOTUNER_ENV = "TLLM_AUTOTUNER_CACHE_PATH"
INSTALL_HINT = ("The trtllm backend needs TensorRT-LLM, which is not installed here. Run this target on a GPU "
                "worker inside NVIDIA's TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release:<version>), "
                "or `pip install tensorrt_llm` from NVIDIA's package index (--extra-index-url "
                "https://pypi.nvidia.com) on a GPU host with a matching CUDA driver.")


class BackendUnavailable(RuntimeError):
    """TensorRT-LLM (or its trtllm-serve) is not installed where this runs."""


class TrtllmError(RuntimeError):
    """A profile could not be built, evaluated or served; the message says what and why."""


def import_trtllm():
    try:
        return importlib.import_module("tensorrt_llm")
    except (ImportError, OSError) as exc:  # OSError: a CUDA/TensorRT shared library that does not load
        raise BackendUnavailable(f"{INSTALL_HINT} (import tensorrt_llm failed: {exc})") from None


def _tensorrt_version() -> str | None:
    try:
        return str(importlib.import_module("tensorrt").__version__)
    except (ImportError, OSError):
        return None


def toolchain_versions() -> dict[str, str | None]:
    trtllm = import_trtllm()
    full = machine.toolchain()
    versions = {"tensorrt_llm": str(trtllm.__version__)}
    if (trt := _tensorrt_version()) is not None:
        versions["tensorrt"] = trt
    return versions | {k: full[k] for k in ("modelopt", "torch", "transformers")}



def target_runtime(target, release: str | None = None) -> TargetRuntime:
    """The runtime facts the validity rules read: the engine kind's runtime, the worker image's release (the
    recipe's `trtllm_version`, else the pinned image's, unless the installed `release` is given)."""
    legacy = target.engine == "legacy"
    return TargetRuntime(runtime="legacy" if legacy else "pytorch",
                         release=release or target.trtllm_version or DEFAULT_TRTLLM_VERSION,
                         kv_cache_dtype="auto" if legacy else target.kv_cache_dtype, checkpoint_per_tp=legacy,
                         needs_gpu="TensorRT-LLM runs only on NVIDIA GPUs")


# ---------------------------------------------------------------------------------------------------------------
# Options


def cuda_graph_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below max_batch_size, and max_batch_size itself."""
    sizes, n = [], 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch_size]


def runtime_options(target) -> dict:
    """The profile's extra_llm_api_options: LlmArgs field names (llmapi/llm_args.py; reference section 3.1).

    With max_num_tokens < max_seq_len, chunked prefill is turned on: without it the PyTorch runtime refuses every
    prompt longer than max_num_tokens ("should not exceed max_num_tokens", llmapi/llm.py; its test
    test_max_num_token_check), so evaluation and serving would fail on long prompts the profile claims to take.
    """
    options = {
        "max_batch_size": target.max_batch_size,
        "max_num_tokens": target.max_num_tokens,
        "max_seq_len": target.max_seq_len,
        "tensor_parallel_size": target.tp,
        "kv_cache_config": {"dtype": target.kv_cache_dtype},
        "cuda_graph_config": {"batch_sizes": cuda_graph_batch_sizes(target.max_batch_size), "enable_padding": True},
    }
    if target.max_num_tokens < target.max_seq_len:
        options["enable_chunked_prefill"] = True
    return options


def llm_kwargs(options: dict) -> dict:
    """LLM(...) keyword arguments from the options file: nested sections become their config classes."""
    llmapi = importlib.import_module("tensorrt_llm.llmapi")
    classes = {"kv_cache_config": llmapi.KvCacheConfig, "cuda_graph_config": llmapi.CudaGraphConfig}
    return {k: classes[k](**v) if k in classes and isinstance(v, dict) else v for k, v in options.items()}


def legacy_build_config(target) -> dict:
    """BuildConfig fields (tensorrt_llm/builder.py). Prompts may fill the window but one token, within a batch."""
    return {"max_batch_size": target.max_batch_size,
            "max_input_len": min(target.max_seq_len - 1, target.max_num_tokens),
            "max_seq_len": target.max_seq_len,
            "max_num_tokens": target.max_num_tokens}


def warmup_batches(max_batch_size: int) -> list[int]:
    return sorted({1, min(4, max_batch_size), min(max_batch_size, 64)})


def read_quant_config(checkpoint: Path) -> dict | None:
    """quant_algo and kv_cache_quant_algo of a ModelOpt export (unified HF: hf_quant_config.json; TensorRT-LLM
    checkpoint: config.json "quantization"); None for an unquantized checkpoint."""
    file = Path(checkpoint) / "hf_quant_config.json"
    if file.is_file():
        quant = json.loads(file.read_text()).get("quantization", {})
    elif (trt := trtllm_checkpoint_config(Path(checkpoint))) is not None:
        quant = trt.get("quantization") or {}
        if not quant.get("quant_algo") and not quant.get("kv_cache_quant_algo"):
            return None
    else:
        return None
    return {"quant_algo": quant.get("quant_algo"), "kv_cache_quant_algo": quant.get("kv_cache_quant_algo")}


def trtllm_checkpoint_config(checkpoint: Path) -> dict | None:
    """config.json of a TensorRT-LLM checkpoint (PretrainedConfig: architecture, mapping, quantization), else None."""
    file = Path(checkpoint) / "config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    return config if "architecture" in config and "mapping" in config else None


def is_legacy(profile_dir: Path) -> bool:
    return (Path(profile_dir) / ENGINE / "config.json").is_file()




def engine_llm_class(trtllm):
    """`tensorrt_llm._tensorrt_engine.LLM`, the TensorRT-engine LLM, or a clear error where it was removed."""
    try:
        return importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
    except ImportError:
        raise TrtllmError(
            f"engine: legacy needs TensorRT-LLM's TensorRT-engine backend (tensorrt_llm._tensorrt_engine), which "
            f"TensorRT-LLM {trtllm.__version__} here does not have: 1.3.0rc20 was the last release with it (PR "
            f"#15918 removed it). Run this target on a worker whose image is TensorRT-LLM <= 1.3.0rc20 (e.g. "
            f"nvcr.io/nvidia/tensorrt-llm/release:1.2.1), or use engine: profile") from None



# ---------------------------------------------------------------------------------------------------------------
# Autotuner cache at load time


def stage_autotuner_cache(profile: Path, scratch: Path) -> Path | None:
    """Copy the profile's autotuner cache to `scratch` and return the path to give TLLM_AUTOTUNER_CACHE_PATH.

    A copy: TensorRT-LLM rewrites the file at the end of its tuning pass, and a profile is immutable (its content
    hash is in the manifest, and its files may be hard links shared with other artifacts).
    """
    source = Path(profile) / AUTOTUNER
    if not source.is_dir() or not any(source.iterdir()):
        return None
    shutil.copytree(source, scratch / AUTOTUNER)
    return scratch / AUTOTUNER / AUTOTUNER_FILE


@contextlib.contextmanager
def autotuner_env(profile: Path) -> Iterator[None]:
    """Best effort in process: the executor's MPI workers may not see a variable set after tensorrt_llm was
    imported (see _run_build_worker); then they tune again, which changes start-up time, not results."""
    with tempfile.TemporaryDirectory(prefix="trtllm-autotuner-") as scratch:
        cache = stage_autotuner_cache(profile, Path(scratch))
        saved = os.environ.get(AUTOTUNER_ENV)
        if cache is not None:
            os.environ[AUTOTUNER_ENV] = str(cache)
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop(AUTOTUNER_ENV, None)
            else:
                os.environ[AUTOTUNER_ENV] = saved




