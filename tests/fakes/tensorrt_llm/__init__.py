"""A fake `tensorrt_llm` for the trtllm backend's contract tests. It is never the real TensorRT-LLM.

It encodes the documented API the backend relies on (shared reference trtllm-modelopt.md section 3; TensorRT-LLM's
`llmapi/llm_args.py`, `builder.py`, `_torch/autotuner.py`):

* constructors accept only the documented argument names (LlmArgs, KvCacheConfig, CudaGraphConfig, BuildConfig,
  SamplingParams) and raise on anything else, as pydantic's extra="forbid" models do;
* `LLM` (PyTorch backend) refuses TensorRT-backend-only arguments with the library's message;
* the PyTorch `LLM` writes the autotuner cache named by TLLM_AUTOTUNER_CACHE_PATH as the real engine's warm-up
  does, reading the variable from the environment this module was *imported* with: the real executor runs in an
  MPI-spawned worker that does not see variables set later (TensorRT-LLM's own tests patch MpiPoolSession to pass
  them);
* `_tensorrt_engine.LLM.save(dir)` writes `config.json` + `rank{N}.engine` like `Engine.save`;
* `prompt_logprobs` are aligned as TensorRT-LLM aligns them: one entry per prompt token, entry i the distribution
  that predicted token i + 1 (the last one predicted the first generated token; executor/base_worker.py scores
  `prompt_token_ids[1:] + first_generation_token` against the context logits), carrying only the top-1 token
  before 1.3.0rc11;
* the PyTorch `LLM.generate` refuses a prompt longer than `max_num_tokens` (default 8192) unless
  `enable_chunked_prefill` is on, with the library's message (llmapi/llm.py `_check_arguments`; its test
  `TestLlmError.test_max_num_token_check`);
* the release decides what exists (RELEASES below): `_tensorrt_engine` and `tensorrt` are gone from 1.3.0rc21 on
  (v1.3.0rc20 was "the last one supporting the TensorRT backend"; PR #15918 deleted `_tensorrt_engine/`).

Every call is kept in CALLS and, when FAKE_TRTLLM_LOG names a file, appended to it as a JSON line (the backend
builds in a child process). Environment knobs: FAKE_TRTLLM_VERSION (__version__, default 1.3.0rc21, the image pin),
FAKE_TRTLLM_LOAD_ERROR (LLM(...) raises RuntimeError with this text), FAKE_TRTLLM_AUTOTUNER=0 (nothing to tune: no
cache file is written).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__version__ = os.environ.get("FAKE_TRTLLM_VERSION", "1.3.0rc21")
_ENV_AT_IMPORT = dict(os.environ)
CALLS: list[dict] = []


def _jsonable(value):
    if isinstance(value, _Config):
        return {"type": type(value).__name__, **{k: _jsonable(v) for k, v in value.kwargs.items()}}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def record(call: str, **data) -> None:
    entry = {"call": call, "pid": os.getpid(), **{k: _jsonable(v) for k, v in data.items()}}
    CALLS.append(entry)
    path = os.environ.get("FAKE_TRTLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


# What changes between releases, by the first release that has the change.
RELEASES = {
    "prompt_logprobs_all_tokens": "1.3.0rc11",  # before it: only the top-1 token per prompt position
    "no_tensorrt_backend": "1.3.0rc21",  # _tensorrt_engine and the tensorrt dependency removed
}


def version_at_least(version: str) -> bool:
    from packaging.version import Version

    return Version(str(globals()["__version__"])) >= Version(version)


def has_tensorrt_backend() -> bool:
    return not version_at_least(RELEASES["no_tensorrt_backend"])


class _Config:
    """A documented config class: unknown fields raise, as in TensorRT-LLM's pydantic models."""
    FIELDS: frozenset[str] = frozenset()
    DEFAULTS: dict = {}

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - self.FIELDS)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown field(s) {unknown} (extra fields not permitted)")
        self.kwargs = kwargs
        self.validate()

    def validate(self) -> None:
        pass

    def __getattr__(self, name):
        if name in type(self).FIELDS:
            return self.kwargs.get(name, type(self).DEFAULTS.get(name))
        raise AttributeError(name)


class KvCacheConfig(_Config):
    FIELDS = frozenset({
        "free_gpu_memory_fraction", "max_tokens", "max_gpu_total_bytes", "host_cache_size", "enable_block_reuse",
        "enable_partial_reuse", "copy_on_partial_reuse", "max_attention_window", "sink_token_length", "dtype",
        "tokens_per_block", "onboard_blocks", "event_buffer_max_size", "use_uvm", "mamba_ssm_cache_dtype"})
    DEFAULTS = {"dtype": "auto", "enable_block_reuse": True, "free_gpu_memory_fraction": 0.9}

    def validate(self):
        # llm_args.py types dtype as a free str; the PyTorch runtime maps "fp8"/"nvfp4" to the KV quant algo and
        # "auto" to the checkpoint's (kv_cache_manager: `kv_cache_config.dtype == "nvfp4"`); nothing else is read.
        if self.dtype not in ("auto", "fp8", "nvfp4"):
            raise ValueError(f"KvCacheConfig.dtype must be auto, fp8 or nvfp4, got {self.dtype!r}")


class CudaGraphConfig(_Config):
    FIELDS = frozenset({"batch_sizes", "max_batch_size", "enable_padding"})
    DEFAULTS = {"enable_padding": False, "max_batch_size": 0}

    def validate(self):
        sizes = self.kwargs.get("batch_sizes")
        if sizes and self.kwargs.get("max_batch_size") not in (None, 0, max(sizes)):
            raise ValueError("CudaGraphConfig.max_batch_size is incompatible with CudaGraphConfig.batch_sizes")


class SamplingParams(_Config):
    FIELDS = frozenset({
        "end_id", "pad_id", "max_tokens", "bad", "bad_token_ids", "stop", "stop_token_ids",
        "include_stop_str_in_output", "embedding_bias", "logits_processor", "apply_batched_logits_processor", "n",
        "best_of", "use_beam_search", "top_k", "top_p", "top_p_min", "top_p_reset_ids", "top_p_decay", "seed",
        "temperature", "min_tokens", "beam_search_diversity_rate", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "length_penalty", "early_stopping", "no_repeat_ngram_size", "min_p", "logprobs",
        "prompt_logprobs", "return_context_logits", "return_generation_logits", "exclude_input_from_output",
        "return_encoder_output", "return_perf_metrics", "additional_model_outputs", "guided_decoding", "ignore_eos",
        "detokenize", "add_special_tokens", "truncate_prompt_tokens", "skip_special_tokens",
        "spaces_between_special_tokens"})
    DEFAULTS = {"max_tokens": 32}


# BuildConfig fields and defaults (tensorrt_llm/builder.py, 1.x; reference section 3.1).
BUILD_CONFIG_DEFAULTS = {
    "max_input_len": 1024, "max_seq_len": None, "opt_batch_size": 8, "max_batch_size": 2048, "max_beam_width": 1,
    "max_num_tokens": 8192, "opt_num_tokens": None, "max_prompt_embedding_table_size": 0, "kv_cache_type": None,
    "gather_context_logits": False, "gather_generation_logits": False, "strongly_typed": True,
    "force_num_profiles": None, "profiling_verbosity": "layer_names_only", "enable_debug_output": False,
    "max_draft_len": 0, "speculative_decoding_mode": "NONE", "use_refit": False, "input_timing_cache": None,
    "output_timing_cache": "model.cache", "lora_config": {}, "weight_sparsity": False, "weight_streaming": False,
    "plugin_config": {}, "use_strip_plan": False, "max_encoder_input_len": 1024, "dry_run": False,
    "visualize_network": None, "monitor_memory": False, "use_mrope": False}


class BuildConfig(_Config):
    FIELDS = frozenset(BUILD_CONFIG_DEFAULTS)
    DEFAULTS = BUILD_CONFIG_DEFAULTS

    def to_dict(self) -> dict:
        return {**BUILD_CONFIG_DEFAULTS, **self.kwargs}


# LlmArgs names: BaseLlmArgs (shared) and the PyTorch backend's TorchLlmArgs; TrtLlmArgs adds the TRT-only ones.
BASE_LLM_ARGS = frozenset({
    "model", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code", "tensor_parallel_size",
    "pipeline_parallel_size", "moe_expert_parallel_size", "dtype", "kv_cache_config", "enable_chunked_prefill",
    "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width", "max_num_tokens", "gather_generation_logits",
    "scheduler_config", "speculative_config", "revision", "load_format"})
TORCH_LLM_ARGS = BASE_LLM_ARGS | {"cuda_graph_config", "enable_autotuner", "torch_compile_config", "print_iter_log",
                                  "disable_overlap_scheduler", "attn_backend"}
TRT_ONLY_ARGS = frozenset({
    "build_config", "quant_config", "calib_config", "workspace", "enable_build_cache", "fast_build",
    "embedding_parallel_mode", "extended_runtime_perf_knob_config", "normalize_log_probs", "batching_type"})
CONFIG_TYPES = {"kv_cache_config": KvCacheConfig, "cuda_graph_config": CudaGraphConfig, "build_config": BuildConfig}


def check_llm_args(kwargs: dict, allowed: frozenset[str]) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"LLM: unknown argument(s) {unknown} (extra fields not permitted)")
    for name, cls in CONFIG_TYPES.items():
        if kwargs.get(name) is not None and not isinstance(kwargs[name], cls):
            raise TypeError(f"LLM: {name} must be a {cls.__name__}, got {type(kwargs[name]).__name__}")


class Logprob(NamedTuple):
    logprob: float
    rank: int | None = None


def fake_logprob(token: int, position: int) -> float:
    """The log-probability the fake gives `token` at `position` of a prompt; it depends on both, so reading the
    entry of the wrong position gives a different sum."""
    return -((token % 7) + 1) / 8 - position / 1024


def fake_rank(token: int) -> int:
    return 1 if token % 2 == 0 else 2


def _prompt_logprobs(tokens: list[int], first_generated: int) -> list[dict]:
    """One entry per prompt token: entry i is the distribution that predicted tokens[i + 1], the last one the first
    generated token (TensorRT-LLM scores prompt_token_ids[1:] + first_generation_token)."""
    entries = []
    for position, token in enumerate(tokens[1:] + [first_generated], start=1):
        actual = Logprob(fake_logprob(token, position), fake_rank(token))
        top = {token ^ 1: Logprob(-0.01, 1)} if actual.rank != 1 else {}
        if version_at_least(RELEASES["prompt_logprobs_all_tokens"]):
            entries.append({token: actual, **top})
        else:  # older releases return only the top-1 token per prompt position
            entries.append(top or {token: actual})
    return entries


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    prompt_logprobs: list[dict] | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class _BaseLLM:
    backend = "pytorch"
    ALLOWED = TORCH_LLM_ARGS

    def __init__(self, model, tokenizer=None, **kwargs):
        kwargs = {"model": model, **({"tokenizer": tokenizer} if tokenizer is not None else {}), **kwargs}
        self._check(kwargs)
        record(f"{self.backend}.LLM", **kwargs)
        if os.environ.get("FAKE_TRTLLM_LOAD_ERROR"):
            raise RuntimeError(os.environ["FAKE_TRTLLM_LOAD_ERROR"])
        if not Path(model).is_dir():
            raise ValueError(f"model path {model} does not exist")
        self.args = kwargs
        self._requests = 0

    def _check(self, kwargs):
        check_llm_args(kwargs, self.ALLOWED)

    def generate(self, inputs, sampling_params=None, use_tqdm=True, **kwargs):
        single = isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int))
        prompts = [inputs] if single else list(inputs)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        for p in params:
            if p is not None and not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        record(f"{self.backend}.LLM.generate", inputs=prompts, sampling_params=params, use_tqdm=use_tqdm, **kwargs)
        outputs = []
        for prompt, p in zip(prompts, params):
            ids = [ord(c) % 97 + 3 for c in prompt[:16]] if isinstance(prompt, str) else list(prompt)
            max_tokens = p.max_tokens if p is not None else 32
            generated = [(sum(ids) + j) % 97 + 3 for j in range(max_tokens)]
            self._check_prompt(ids)
            logprobs = (_prompt_logprobs(ids, generated[0]) if p is not None and p.prompt_logprobs is not None
                        else None)
            outputs.append(RequestOutput(self._requests, prompt if isinstance(prompt, str) else None, ids,
                                         [CompletionOutput(0, " fake" * max_tokens, generated, logprobs)]))
            self._requests += 1
        return outputs[0] if single else outputs

    def shutdown(self):
        record(f"{self.backend}.LLM.shutdown")

    def _check_prompt(self, ids: list[int]) -> None:
        pass


class LLM(_BaseLLM):
    """`from tensorrt_llm import LLM`: the PyTorch backend."""

    def _check(self, kwargs):
        backend = kwargs.pop("backend", "pytorch")
        if backend != "pytorch":
            raise ValueError(f"fake LLM supports backend 'pytorch' only, got {backend!r}")
        trt_only = sorted(set(kwargs) & TRT_ONLY_ARGS)
        if trt_only:
            raise ValueError(f"{trt_only} arguments are specific to TensorRT backend; for the TensorRT backend "
                             f"use 'from tensorrt_llm._tensorrt_engine import LLM'")
        super()._check(kwargs)

    def __init__(self, model, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        if self.args.get("enable_autotuner", True):
            self._autotune()

    def _check_prompt(self, ids: list[int]) -> None:
        """llm.py _check_arguments, PyTorch backend without chunked prefill (test_max_num_token_check)."""
        max_num_tokens = self.args.get("max_num_tokens", 8192)
        if not self.args.get("enable_chunked_prefill") and max_num_tokens and len(ids) > max_num_tokens:
            raise ValueError(f"The sum of prompt length ({float(len(ids))}), query length (0) should not exceed "
                             f"max_num_tokens ({max_num_tokens})")

    def _autotune(self):
        """As the model engine's autotuner warm-up: autotune(cache_path=$TLLM_AUTOTUNER_CACHE_PATH) loads the file
        when present and saves {metadata, rank_<r>} to it on exit."""
        path = _ENV_AT_IMPORT.get("TLLM_AUTOTUNER_CACHE_PATH")
        if not path or _ENV_AT_IMPORT.get("FAKE_TRTLLM_AUTOTUNER") == "0":
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        content = json.loads(path.read_text()) if path.is_file() else {
            "metadata": {"lib_version": __version__, "creation_timestamp": time.time(),
                         "device_name": "FAKE GPU", "device_capability": [9, 0]}}
        content["rank_0"] = {"('trtllm::fake_gemm', 'FakeRunner', '()', ((16, 64),))":
                             {"runner_id": 0, "tactic": "3", "min_time": 0.01}}
        path.write_text(json.dumps(content, indent=2))
        record("autotuner.save_cache", path=str(path))


from tensorrt_llm import llmapi  # noqa: E402  (the submodule, as the real package exposes it)
