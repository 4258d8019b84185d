"""The model in this process: where it runs, the dtype it is stored and loaded in, loading a checkpoint (with its
ModelOpt quantizers), the memory check before loading, and a forward-pass probe for time estimates.

Shared by the stages that run a model in process (quantization's recovery rungs, and the next training stages);
they import it, it imports none of them.
"""

from __future__ import annotations

import threading
import time

from tasks.models import quant_state
from tasks.models.placement import DoesNotFit

GIB = 2**30
# ModelOpt's quantized attention swaps transformers' module-level attention function in and out around every
# forward pass; two models running at once in one process (parallel targets) can leave the swapped-in function
# behind for every later model. So in-process model compute is serialised; served models run in their own process.
MODEL_LOCK = threading.RLock()


def work_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def stored_dtype(device: str):
    """The dtype checkpoints are stored in and the reference backend loads on `device`: bf16 on CUDA, else fp32."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def load_model(model_dir: str, device: str, *, dtype=None):
    """A base checkpoint, or a PTQ fake-quant checkpoint with its quantizers restored (tasks/models/quant_state.py).
    bf16 on CUDA unless `dtype` says otherwise, float32 on CPU."""
    import modelopt.torch.opt as mto
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mto.enable_huggingface_checkpointing()  # a saved quantized model (modelopt_state.pth) comes back quantized
    dtype = dtype or stored_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    if quant_state.is_quant_state_dir(model_dir):
        model = quant_state.restore(model, model_dir)
    model.config.architectures = [type(model).__name__]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_memory(need_bytes: float, device: str, what: str, hint: str) -> float:
    """Refuse before starting when the estimated peak does not fit in what is free; returns the free GiB."""
    if device == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need_bytes > free:
        raise DoesNotFit(f"{what} needs about {need_bytes / GIB:.1f} GiB of {device} memory, {free / GIB:.1f} GiB "
                            f"is free; {hint}")
    return free / GIB


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def probe_seconds(model, batch: dict) -> float:
    """Seconds for one forward pass of `batch` (the unit the time estimates multiply)."""
    import torch

    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})  # warm-up
        started = time.perf_counter()
        model(**{k: v for k, v in batch.items() if k != "labels"})
        if batch["input_ids"].is_cuda:
            torch.cuda.synchronize()
    return time.perf_counter() - started
