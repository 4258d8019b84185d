"""The reference backend's build, evaluation and generation: transformers + ModelOpt fake quantization.

It computes what the quantized model computes (numerically), so accuracy gates are meaningful, but its speed is the
reference runtime's, not that of quantized kernels: latency results from this backend say so in their `runtime` field.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import yaml

from tasks import store
from tasks.decisions.targets import TargetRuntime
from tasks.host import machine
from tasks.models.runtime import MODEL_LOCK

log = logging.getLogger(__name__)

RUNTIME_FILE = "runtime.yaml"
CHECKPOINT = "checkpoint"
# Versions that change what a reference profile computes; a profile built with others is refused at load.
TOOLCHAIN_KEYS = ("torch", "transformers", "modelopt")


def target_runtime(target) -> TargetRuntime:
    """Validity is ModelOpt's deployment matrix (the reference runtime computes what any deployment would)."""
    return TargetRuntime(runtime="reference")


def toolchain_versions() -> dict[str, str | None]:
    full = machine.toolchain()
    return {k: full[k] for k in TOOLCHAIN_KEYS}


def build_profile(*, checkpoint_dir: str, target, device: dict, out: Path) -> dict:
    """Write the deployment profile: the checkpoint (hard-linked), runtime options, and a load check on the device.

    Returns the build options recorded in the manifest.
    """
    store.link_or_copy_tree(Path(checkpoint_dir), out / CHECKPOINT)
    options = {
        "backend": "reference",
        "device": device["device"],
        "dtype": "bfloat16" if device["device"] == "cuda" else "float32",
        "max_batch_size": target.max_batch_size,
        "max_seq_len": target.max_seq_len,
    }
    (out / RUNTIME_FILE).write_text(yaml.safe_dump(options, sort_keys=True))
    import torch

    with MODEL_LOCK, torch.no_grad():  # the profile must load and run on its target before it exists
        model, tokenizer = load_model(out, options)
        model(**tokenizer("build check", return_tensors="pt").to(model.get_input_embeddings().weight.device))
        del model
    return options


def load_model(profile_dir: Path, options: dict | None = None, *, fold: bool = True):
    """The profile's model: base weights, with ModelOpt's quantizer state restored onto them when it has one.

    fold: bake each weight quantizer into its weight once, here (ModelOpt's `mtq.fold_weight`: the weight becomes
    quantize-dequantize(weight), the weight quantizer is disabled and its amax dropped), so a forward runs only the
    activation (input, output, KV) quantizers instead of re-quantizing every weight on every forward. The numbers
    are the same: the fold applies the very quantizer the forward would (tests/unit/backends/test_reference_fold.py).
    The files on disk are not touched; only the loaded model's weights are replaced.

    On CUDA it goes to one GPU or, when it does not fit one, is sharded over the visible GPUs
    (tasks/models/placement.py).
    """
    import modelopt.torch.opt as mto
    import torch
    from transformers import AutoTokenizer

    from tasks.models import placement, quant_state

    options = options or yaml.safe_load((Path(profile_dir) / RUNTIME_FILE).read_text())
    mto.enable_huggingface_checkpointing()  # profiles built before quant_state.json carry modelopt_state.pth
    ckpt = Path(profile_dir) / CHECKPOINT
    dtype = getattr(torch, options["dtype"])
    where = placement.plan(ckpt, dtype=dtype, device=options["device"], what=f"profile {profile_dir}")
    model = placement.load_causal_lm(ckpt, dtype=dtype, placement=where)
    if quant_state.is_quant_state_dir(ckpt):
        model = quant_state.restore(model, ckpt).eval()
        if fold:
            import modelopt.torch.quantization as mtq

            with torch.no_grad():
                mtq.fold_weight(model)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def session(profile_dir: Path) -> contextlib.AbstractContextManager:
    """Nothing is shared between the stages: accuracy runs in process, latency in the reference server."""
    return contextlib.nullcontext()


@contextlib.contextmanager
def lm_eval_model(profile_dir: Path, *, batch_size: int, max_length: int) -> Iterator[object]:
    """An lm-eval LM over the built model, in process (lm-eval's HFLM with the model object)."""
    from lm_eval.models.huggingface import HFLM

    with MODEL_LOCK:
        model, tokenizer = load_model(profile_dir)
        try:
            # log-softmax, gather and sum in float32: lm-eval does them in the model's dtype unless told, and a bf16
            # sum of a window's ~256 token log-probs is rounded to 2-8 nats (its ulp), noise the size of the gates
            yield HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                       softmax_dtype="float32")
        finally:
            del model


def generator(profile_dir: Path):
    """Load the profile once; return ``generate(prompts, max_new_tokens) -> completions`` (greedy), for the
    registry's pyfunc model (registry/pyfunc_model.py)."""
    import torch

    with MODEL_LOCK:
        model, tokenizer = load_model(Path(profile_dir))

    def generate(prompts: list[str], max_new_tokens: int) -> list[str]:
        completions = []
        with MODEL_LOCK, torch.no_grad():
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt").to(model.device)
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                completions.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return completions

    return generate


@contextlib.contextmanager
def serve(profile_dir: Path, *, host: str = "127.0.0.1", port: int, log_file: Path) -> Iterator[str]:
    """The profile behind an OpenAI-compatible endpoint (tasks/backends/reference/server.py); yields the base URL."""
    import sys

    from tasks.backends.serving import run_server

    cmd = [sys.executable, "-m", "tasks.backends.reference.server", "--profile", str(profile_dir), "--host", host,
           "--port", str(port)]
    with run_server(cmd, health_url=f"http://{host}:{port}/health", log_file=log_file, name="reference-server"):
        yield f"http://{host}:{port}/v1"
