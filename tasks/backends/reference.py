"""The reference backend: transformers + ModelOpt fake quantization, on the CPU or any CUDA GPU.

It computes what the quantized model computes (numerically), so accuracy gates are meaningful, but its speed is the
reference runtime's, not that of quantized kernels: latency results from this backend say so in their `runtime` field.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Iterator

import yaml

from tasks import store

log = logging.getLogger(__name__)

NAME = "reference"
RUNTIME_FILE = "runtime.yaml"
# Versions that change what a reference profile computes; a profile built with others is refused at load.
TOOLCHAIN_KEYS = ("torch", "transformers", "modelopt")


def toolchain_versions() -> dict[str, str | None]:
    full = store.toolchain()
    return {k: full[k] for k in TOOLCHAIN_KEYS}


def build_profile(*, checkpoint_dir: str, target, device: dict, out: Path) -> dict:
    """Write the deployment profile: the checkpoint (hard-linked), runtime options, and a load check on the device.

    Returns the build options recorded in the manifest.
    """
    store.link_or_copy_tree(Path(checkpoint_dir), out / "checkpoint")
    options = {
        "backend": NAME,
        "device": device["device"],
        "dtype": "bfloat16" if device["device"] == "cuda" else "float32",
        "max_batch_size": target.max_batch_size,
        "max_seq_len": target.max_seq_len,
    }
    (out / RUNTIME_FILE).write_text(yaml.safe_dump(options, sort_keys=True))
    model, tokenizer = load_model(out, options)  # the profile must load and run on its target before it exists
    import torch

    with torch.no_grad():
        model(**tokenizer("build check", return_tensors="pt").to(options["device"]))
    del model
    return options


def load_model(profile_dir: Path, options: dict | None = None):
    import modelopt.torch.opt as mto
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = options or yaml.safe_load((Path(profile_dir) / RUNTIME_FILE).read_text())
    mto.enable_huggingface_checkpointing()  # restores ModelOpt quantizers from modelopt_state.pth when present
    ckpt = Path(profile_dir) / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, options["dtype"]))
    model = model.to(options["device"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@contextlib.contextmanager
def lm_eval_model(profile_dir: Path, *, batch_size: int, max_length: int) -> Iterator[object]:
    """An lm-eval LM over the built model, in process (lm-eval's HFLM with the model object)."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_model(profile_dir)
    try:
        yield HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    finally:
        del model


def time_generation(profile_dir: Path, prompts: list[list[int]], *, output_tokens: int, warmup: int) -> list[dict]:
    """Generate exactly `output_tokens` per prompt (EOS ignored) and record when each token arrived.

    Returns one record per measured request: start time and per-token arrival times (perf_counter seconds).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    model, tokenizer = load_model(profile_dir)
    device = next(model.parameters()).device

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:  # generate() first passes the prompt through the streamer
                self.prompt_seen = True
                return
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    records = []
    for i, ids in enumerate(prompts):
        clock = Clock()
        input_ids = torch.tensor([ids], device=device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=output_tokens,
                           min_new_tokens=output_tokens, do_sample=False, streamer=clock,
                           pad_token_id=tokenizer.pad_token_id)
        if i >= warmup:
            records.append({"start": start, "token_times": clock.times})
    del model
    return records
