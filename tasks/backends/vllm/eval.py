"""lm-eval against the served profile: lm-eval's `local-completions` model over vLLM's /v1/completions.

Not lm-eval's `vllm` model: that one imports vLLM into this process (lm_eval/models/vllm_causallms.py, 0.4.13), and
vLLM pins its own torch and transformers. Log-likelihoods come from the engine itself (`echo` + `logprobs`, the
prompt tokens' log-probabilities: vLLM entrypoints/openai/completion/serving.py), so accuracy is the runtime's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tasks.backends.vllm.common import CHECKPOINT, SERVED_NAME
from tasks.backends.vllm.server import serve


@contextlib.contextmanager
def lm_eval_model(profile_dir: Path, *, batch_size: int, max_length: int) -> Iterator[object]:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    with serve(Path(profile_dir)) as url:
        yield LocalCompletionsAPI(model=SERVED_NAME, base_url=f"{url}/completions",
                                  tokenizer=str(Path(profile_dir) / CHECKPOINT), tokenizer_backend="huggingface",
                                  tokenized_requests=True, num_concurrent=batch_size, max_length=max_length,
                                  max_retries=3, timeout=600)
