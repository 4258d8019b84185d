"""lm-eval over a trtllm profile, in process: lm-eval's own `trtllm` LM over an LLM loaded with the profile's runtime
options, reading TensorRT-LLM's prompt logprobs with their real alignment. Part of the trtllm backend
(tasks/backends/trtllm/); nothing here has run against a real TensorRT-LLM (see that module)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
from collections.abc import Iterator
from pathlib import Path

import yaml

from tasks.backends.trtllm.common import (
    CHECKPOINT,
    ENGINE,
    OPTIONS_FILE,
    TrtllmError,
    autotuner_env,
    engine_llm_class,
    import_trtllm,
    is_legacy,
    llm_kwargs,
)

# Before this release prompt_logprobs carry only the top-1 token per position, so loglikelihood cannot be scored
# (ModelOpt examples/llm_eval/README.md; reference section 2).
LOGLIKELIHOOD_SINCE = "1.3.0rc11"


def loglikelihood_blocker(version: str, *, legacy: bool) -> str | None:
    """Why loglikelihood (and perplexity) requests cannot be scored on this profile, or None when they can."""
    from packaging.version import InvalidVersion, Version

    if legacy:
        return ("loglikelihood needs prompt logprobs, which this legacy TensorRT engine cannot return (it was not "
                "built with gather_context_logits); evaluate generate-until tasks only, or gate accuracy with the "
                "reference backend")
    try:
        supported = Version(str(version)) >= Version(LOGLIKELIHOOD_SINCE)
    except InvalidVersion:
        supported = False
    if supported:
        return None
    return (f"TensorRT-LLM {version} cannot score loglikelihood or perplexity tasks: before {LOGLIKELIHOOD_SINCE} "
            f"prompt_logprobs carry only the top-1 token per position, so lm-eval would fail with a KeyError. Use "
            f"a TensorRT-LLM >= {LOGLIKELIHOOD_SINCE} container, generate-until tasks only, or gate accuracy with "
            f"the reference backend")


def continuation_logprob(tokens: list[int], outputs, ctxlen: int) -> tuple[float, bool]:
    """Sum of the continuation tokens' logprobs, and whether each was the top-1 token.

    TensorRT-LLM aligns prompt_logprobs to the next token: entry i is the distribution that predicted
    tokens[i + 1] (its worker computes them from prompt_token_ids[1:] + the first generated token). lm-eval
    0.4.12/0.4.13's TRTLLM._parse_logprobs reads entry i for tokens[i] and raises KeyError (ModelOpt
    examples/llm_eval/lm_eval_trtllm.py replaces it for the same reason).
    """
    entries = outputs.outputs[0].prompt_logprobs
    if entries is None or len(entries) < len(tokens) - 1:
        raise TrtllmError(f"prompt_logprobs has {0 if entries is None else len(entries)} entries for "
                          f"{len(tokens)} prompt tokens; TensorRT-LLM scored a different prompt than was sent")
    total, greedy = 0.0, True
    for i in range(max(ctxlen, 1), len(tokens)):  # token 0 has no preceding distribution
        entry = entries[i - 1]
        scored = entry.get(tokens[i])
        if scored is None:
            raise TrtllmError(f"token {tokens[i]} at position {i} is missing from prompt_logprobs[{i - 1}]; "
                              f"the logprobs do not match the prompt")
        total += scored.logprob
        if scored.rank is not None:
            greedy = greedy and scored.rank == 1
        else:
            greedy = greedy and scored.logprob >= max(e.logprob for e in entry.values())
    return total, greedy


@contextlib.contextmanager
def _swapped(module, name: str, value) -> Iterator[None]:
    missing = object()
    saved = getattr(module, name, missing)
    setattr(module, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(module, name)
        else:
            setattr(module, name, saved)


@functools.cache
def _profile_lm_class():
    from lm_eval.models import trtllm_causallms as upstream

    class ProfileTRTLLM(upstream.TRTLLM):
        """lm-eval's own `trtllm` LM (tokenization, batching, requests) over an LLM loaded with the profile's
        runtime options, with TensorRT-LLM's prompt-logprob alignment read correctly."""

        def __init__(self, *, llm_factory, loglikelihood_blocked: str | None, **kwargs):
            self.loglikelihood_blocked = loglikelihood_blocked
            # TRTLLM.__init__ calls its module's `LLM(**its own kwargs)` and cannot pass further LlmArgs (KV-cache
            # dtype, CUDA graphs, max_num_tokens): the profile's factory stands in for that one call.
            with _swapped(upstream, "LLM", llm_factory):
                super().__init__(**kwargs)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
            if self.loglikelihood_blocked:
                raise TrtllmError(self.loglikelihood_blocked)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm)

        _parse_logprobs = staticmethod(continuation_logprob)

    return ProfileTRTLLM


def _eval_limits(profile: Path) -> dict:
    if is_legacy(profile):
        config = json.loads((profile / ENGINE / "config.json").read_text())
        build = config["build_config"]
        return {"max_seq_len": build["max_seq_len"], "max_batch_size": build["max_batch_size"],
                "max_input_len": build["max_input_len"], "tp": config["pretrained_config"]["mapping"]["tp_size"]}
    options = yaml.safe_load((profile / OPTIONS_FILE).read_text())
    return {"max_seq_len": options["max_seq_len"], "max_batch_size": options["max_batch_size"],
            "max_input_len": options["max_seq_len"] - 1, "tp": options["tensor_parallel_size"]}


def _eval_llm(trtllm, profile: Path, **lm_eval_kwargs):
    """The LLM for evaluation: the profile's options, KV-block reuse off (reused blocks return no prompt
    logprobs), and lm-eval's max_input_len."""
    kv_cache_config = importlib.import_module("tensorrt_llm.llmapi").KvCacheConfig
    if is_legacy(profile):
        return engine_llm_class(trtllm)(model=str(profile / ENGINE), tokenizer=str(profile / CHECKPOINT),
                                         kv_cache_config=kv_cache_config(enable_block_reuse=False))
    options = yaml.safe_load((profile / OPTIONS_FILE).read_text())
    kwargs = llm_kwargs(options)
    kwargs["kv_cache_config"] = kv_cache_config(**{**options.get("kv_cache_config", {}), "enable_block_reuse": False})
    return trtllm.LLM(model=str(profile / CHECKPOINT), max_input_len=lm_eval_kwargs["max_input_len"], **kwargs)


def lm_eval_model(profile_dir: Path, *, batch_size: int, max_length: int):
    """A context manager yielding an lm-eval LM over the profile, in process (lm-eval's `trtllm` model type)."""
    trtllm = import_trtllm()
    profile = Path(profile_dir)
    return _lm_eval_model(trtllm, profile, batch_size=batch_size, max_length=max_length)


@contextlib.contextmanager
def _lm_eval_model(trtllm, profile: Path, *, batch_size: int, max_length: int) -> Iterator[object]:
    from lm_eval.models import trtllm_causallms as upstream

    # lm-eval binds these names at its import, inside try/except: if it was imported before tensorrt_llm could be,
    # they are missing. Bind them to the tensorrt_llm this process uses.
    upstream.SamplingParams = trtllm.SamplingParams
    upstream.KvCacheConfig = importlib.import_module("tensorrt_llm.llmapi").KvCacheConfig
    limits = _eval_limits(profile)
    max_input_len = min(max_length, limits["max_input_len"])
    with autotuner_env(profile):
        lm = _profile_lm_class()(
            llm_factory=functools.partial(_eval_llm, trtllm, profile),
            loglikelihood_blocked=loglikelihood_blocker(trtllm.__version__, legacy=is_legacy(profile)),
            model=str(profile / CHECKPOINT), tokenizer=str(profile / CHECKPOINT),
            max_batch_size=limits["max_batch_size"], max_input_len=max_input_len,
            max_output_len=limits["max_seq_len"] - max_input_len, tensor_parallel_size=limits["tp"],
            batch_size=batch_size)
        try:
            yield lm
        finally:
            lm.llm.shutdown()
