"""Where a model's weights go: one GPU, sharded over the visible GPUs (``device_map``), or the CPU.

Decided from the config alone (parameter count × dtype) against the memory the GPUs report free, before any weight
is read, so a model that cannot fit is refused in seconds with what to change, not after a long load. Sharding
follows ModelOpt's own examples (hf_ptq.py / example_utils.get_model): ``device_map="auto"`` with a per-GPU
``max_memory`` budget, accelerate placing whole decoder layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

GIB = 2**30
# Calibration and evaluation need room besides the weights: activations, logits (batch × seq × vocab in fp32),
# ModelOpt's quantizer buffers and the CUDA context. Weights may use at most this share of a GPU's free memory.
WEIGHT_SHARE = 0.80
RESERVE_BYTES = 2 * GIB


class DoesNotFit(RuntimeError):
    """The model's weights do not fit the memory of the devices this process sees."""


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda", "cpu"
    weight_bytes: int
    device_map: str | dict | None = None  # None: one device (model.to(device)); "auto": sharded
    max_memory: dict = field(default_factory=dict)
    gpus: int = 1

    @property
    def sharded(self) -> bool:
        return self.device_map is not None

    def load_kwargs(self) -> dict:
        """Keyword arguments for ``from_pretrained``: weights go straight to their GPU(s), no CPU copy first."""
        if self.sharded:
            return {"device_map": self.device_map, "max_memory": self.max_memory}
        return {"device_map": "cuda:0"} if self.device == "cuda" else {}

    def describe(self) -> str:
        if self.sharded:
            return (f"{self.weight_bytes / GIB:.1f} GiB of weights sharded over {self.gpus} GPUs "
                    f"(budget per GPU: {', '.join(f'{v / GIB:.0f} GiB' for v in self.max_memory.values())})")
        return f"{self.weight_bytes / GIB:.1f} GiB of weights on {self.device}"


def weight_bytes(model_dir: str | Path, dtype) -> tuple[int, int]:
    """(parameters, bytes) of the model in ``dtype``, from its config on the meta device (nothing loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    return params, params * torch.empty((), dtype=dtype).element_size()


def free_gpu_memory() -> list[tuple[str, int, int]]:
    """(name, free bytes, total bytes) of each visible GPU."""
    import torch

    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append((torch.cuda.get_device_name(i), free, total))
    return out


def decide(need: int, gpus: list[tuple[str, int, int]], *, params: int = 0, dtype_name: str = "bfloat16",
           what: str = "the model") -> Placement:
    """One GPU when the weights fit the first one's budget, else sharded over all visible GPUs, else DoesNotFit.

    Raises:
        DoesNotFit: naming the model size, the memory each GPU has free, and what to change.
    """
    if not gpus:
        return Placement(device="cpu", weight_bytes=need)
    budgets = [max(0, int(free * WEIGHT_SHARE) - RESERVE_BYTES) for _, free, _ in gpus]
    if need <= budgets[0]:
        return Placement(device="cuda", weight_bytes=need)
    if len(gpus) > 1 and need <= sum(budgets):
        return Placement(device="cuda", weight_bytes=need, device_map="auto",
                         max_memory={i: b for i, b in enumerate(budgets)}, gpus=len(gpus))
    seen = "; ".join(f"GPU {i} {name}: {free / GIB:.1f} of {total / GIB:.1f} GiB free"
                     for i, (name, free, total) in enumerate(gpus))
    raise DoesNotFit(
        f"{what} needs {need / GIB:.1f} GiB for its weights ({params / 1e9:.2f}B parameters in {dtype_name}), plus "
        f"room for activations; the {len(gpus)} visible GPU(s) can hold {sum(budgets) / GIB:.1f} GiB "
        f"({WEIGHT_SHARE:.0%} of free memory less {RESERVE_BYTES / GIB:.0f} GiB each: {seen}). Run it on a worker "
        f"with more or larger GPUs (all of them visible: CUDA_VISIBLE_DEVICES), free the GPUs other processes hold, "
        f"or use a smaller model.")


def plan(model_dir: str | Path, *, dtype, device: str, what: str | None = None) -> Placement:
    """Where ``model_dir`` goes on this machine (``device``: "cuda" or "cpu")."""
    import torch

    params, need = weight_bytes(model_dir, dtype)
    if device != "cuda" or not torch.cuda.is_available():
        return Placement(device="cpu", weight_bytes=need)
    placement = decide(need, free_gpu_memory(), params=params, dtype_name=str(dtype).removeprefix("torch."),
                       what=what or f"model {Path(model_dir).name}")
    log.info("placement: %s", placement.describe())
    return placement


def load_causal_lm(model_dir: str | Path, *, dtype, placement: Placement):
    """``from_pretrained`` onto the planned device(s), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **placement.load_kwargs()).eval()


def input_device(model) -> str:
    """Where a (possibly sharded) model takes its inputs: the embedding's device."""
    return str(model.get_input_embeddings().weight.device)
