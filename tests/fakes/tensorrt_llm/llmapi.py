"""Fake `tensorrt_llm.llmapi`: the public API exports the backend uses (reference section 3.1)."""

from tensorrt_llm import BuildConfig, CudaGraphConfig, KvCacheConfig, LLM, SamplingParams  # noqa: F401
