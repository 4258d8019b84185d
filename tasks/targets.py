"""GPU targets as data: the GPU catalogue, format x architecture validity, and the plan of (format, target) pairs.

Everything here is decided before any GPU time is spent: an invalid pair is skipped with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# name -> (compute capability, memory GiB). Names are matched case-insensitively.
GPU_CATALOGUE: dict[str, tuple[str, int]] = {
    "A100": ("sm_80", 80), "A30": ("sm_80", 24), "A10": ("sm_86", 24), "A10G": ("sm_86", 24), "A40": ("sm_86", 48),
    "L4": ("sm_89", 24), "L40": ("sm_89", 48), "L40S": ("sm_89", 48),
    "H100": ("sm_90", 80), "H200": ("sm_90", 141), "GH200": ("sm_90", 96), "H20": ("sm_90", 96),
    "B200": ("sm_100", 192), "GB200": ("sm_100", 192), "B300": ("sm_103", 288), "GB300": ("sm_103", 288),
    "RTX-PRO-6000": ("sm_120", 96), "RTX-5090": ("sm_120", 32),
}

# format -> (lowest compute capability that serves it, why). Sources: ModelOpt support matrix and TensorRT-LLM's
# quantization feature table (see shared reference trtllm-modelopt.md section 1.7).
MIN_SM: dict[str, tuple[int, str]] = {
    "nvfp4": (100, "NVFP4 kernels exist only on Blackwell (sm_100+)"),
    "fp8": (89, "FP8 needs Ada/Hopper or newer (sm_89+)"),
    "w4a8_awq": (89, "W4A8 uses FP8 activations: sm_89+"),
    "int4_awq": (80, "INT4-AWQ (W4A16) needs Ampere or newer (sm_80+)"),
    "int8_sq": (80, "INT8-SmoothQuant needs Ampere or newer (sm_80+)"),
}
LEGACY_ENGINE_ONLY = {"int8_sq": "INT8-SmoothQuant is served only by TensorRT-LLM's legacy TensorRT-engine path "
                                 "(TRT-LLM <= 1.2; set targets[].engine: legacy); the PyTorch runtime has no "
                                 "SmoothQuant kernels"}
# TensorRT-LLM's legacy engine builder (tensorrt_llm/builder.py::build, 1.x) raises on SM 100-119 for INT8/INT4
# weight-only, INT8 KV cache, SmoothQuant and per-channel/per-token scaling (reference section 1.7). Its check is
# `100 <= sm < 120`: sm_120 is not covered by it.
LEGACY_REFUSED_SM = range(100, 120)
LEGACY_REFUSED = {"int8_sq": "SmoothQuant", "int4_awq": "INT4 weight-only (W4A16 AWQ)"}
CUDA_CALIBRATION = {"nvfp4": "NVFP4 calibration needs CUDA (ModelOpt's FP4 kernels); this run quantizes on the CPU"}


def arch_of(gpu: str) -> str:
    """'H100' -> 'sm_90'; 'sm_90' -> 'sm_90'. 'auto' must be resolved against a device first."""
    if re.fullmatch(r"sm_\d{2,3}", gpu):
        return gpu
    for name, (arch, _) in GPU_CATALOGUE.items():
        if name.lower() == gpu.lower():
            return arch
    raise ValueError(f"unknown GPU '{gpu}': use 'auto', 'sm_XY', or one of {', '.join(GPU_CATALOGUE)}")


def sm_number(arch: str) -> int | None:
    match = re.fullmatch(r"sm_(\d+)", arch)
    return int(match.group(1)) if match else None


def invalid_reason(fmt: str, arch: str, *, backend: str, quant_device: str, engine: str = "profile") -> str | None:
    """Why this format cannot be built/served for this arch, backend and engine kind, or None when it can."""
    if fmt in CUDA_CALIBRATION and quant_device != "cuda":
        return CUDA_CALIBRATION[fmt]
    sm = sm_number(arch)
    if sm is None:
        return f"TensorRT-LLM runs only on NVIDIA GPUs; target is {arch}" if backend == "trtllm" else None
    need, why = MIN_SM[fmt]
    if sm < need:
        return f"{why}; target is {arch}"
    if backend == "trtllm" and engine != "legacy" and fmt in LEGACY_ENGINE_ONLY:
        return LEGACY_ENGINE_ONLY[fmt]
    if backend == "trtllm" and engine == "legacy" and sm in LEGACY_REFUSED_SM and fmt in LEGACY_REFUSED:
        return (f"TensorRT-LLM's legacy engine builder refuses {LEGACY_REFUSED[fmt]} on SM 100-119 "
                f"(tensorrt_llm/builder.py); target is {arch}")
    return None


@dataclass(frozen=True)
class Pair:
    format: str
    target: str
    arch: str
    skip_reason: str | None = None


@dataclass
class Plan:
    pairs: list[Pair] = field(default_factory=list)
    target_arch: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)  # target -> why it cannot run from here
    format_order: list[str] = field(default_factory=list)  # the recipe's ladder order

    @property
    def runnable(self) -> list[Pair]:
        return [p for p in self.pairs if p.skip_reason is None]

    @property
    def formats_to_quantize(self) -> list[str]:
        """Formats valid for at least one target's architecture, placed here or not: quantization happens once,
        where the flow runs, and is shared by every target (a pool's workers read it from the shared store)."""
        wanted = {p.format for p in self.pairs if p.skip_reason in (None, self.unplaced.get(p.target))}
        return [f for f in self.format_order if f in wanted]


def resolve_target_arch(target, local: dict) -> str:
    return local["arch"] if target.gpu == "auto" else arch_of(target.gpu)


def make_plan(recipe, local: dict, *, dispatch: bool = False) -> Plan:
    """Every (format, target) pair in recipe order; invalid or unplaceable ones carry their skip reason.

    A target whose architecture differs from this machine's runs only when `dispatch` is on (a Prefect server is
    reachable) and the target names a work pool; otherwise it is unplaced, with the reason.
    """
    plan = Plan(format_order=list(recipe.quantization.formats))
    for target in recipe.targets:
        arch = resolve_target_arch(target, local)
        plan.target_arch[target.name] = arch
        if arch != local["arch"] and not (dispatch and target.work_pool):
            plan.unplaced[target.name] = (
                f"target '{target.name}' needs {arch} but this machine is {local['arch']}; " + (
                    f"it runs on a worker of its pool '{target.work_pool}' (`enginewright deploy` makes one "
                    f"deployment per pool; run that deployment)" if target.work_pool else
                    "set targets[].work_pool to a Prefect work pool whose workers have that GPU"))
        for fmt in recipe.quantization.formats:
            reason = invalid_reason(fmt, arch, backend=target.backend, quant_device=local["device"],
                                    engine=target.engine)
            reason = reason or plan.unplaced.get(target.name)
            plan.pairs.append(Pair(fmt, target.name, arch, reason))
    return plan
