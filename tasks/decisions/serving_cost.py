"""Serving cost as data: what a format costs to serve on an architecture, for ranking when speed cannot decide.

Used where latency was not measured on a deployment runtime (the reference backend), or where two measurements are
not comparable. The model, most important first:
  1. kernels: a format whose kernels the target architecture lacks is served by dequantizing to 16 bit, so it
     saves memory at best, never time (TensorRT-LLM's runtimes in tasks/decisions/targets.py's VALIDITY_RULES; a CPU
     target has none);
  2. weight bits: LLM decode is bound by reading weights, so fewer bits per weight serve faster at the batch sizes
     that matter (nominal bits; an AutoQuantize checkpoint counts its reached effective bits);
  3. activation bits: prefill and large batches are compute-bound, and low-precision activations use faster
     tensor-core paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.decisions.targets import VALIDITY_RULES, sm_number


@dataclass(frozen=True)
class FormatCost:
    weight_bits: int  # nominal bits per weight
    activation_bits: int  # bits of the matmul inputs


SERVING_COST: dict[str, FormatCost] = {
    "nvfp4": FormatCost(4, 4),
    "w4a8_awq": FormatCost(4, 8),
    "int4_awq": FormatCost(4, 16),
    "fp8": FormatCost(8, 8),
    "int8_sq": FormatCost(8, 8),
    "none": FormatCost(16, 16),
}


def has_kernels(fmt: str, arch: str) -> bool:
    """Whether `arch` has quantized kernels for `fmt` (the unquantized baseline always runs)."""
    if fmt == "none":
        return True
    sm = sm_number(arch)
    return sm is not None and any(r.format == fmt and sm in r.sms and r.runtime in ("pytorch", "legacy")
                                  for r in VALIDITY_RULES)


def cost_key(fmt: str, arch: str, *, weight_bits: float | None = None) -> tuple:
    """Smaller serves cheaper. `weight_bits` overrides the table for mixed-precision checkpoints (AutoQuantize),
    whose cost is their effective bits."""
    cost = SERVING_COST.get(fmt, SERVING_COST["none"])
    return (0 if has_kernels(fmt, arch) else 1, weight_bits if weight_bits is not None else cost.weight_bits,
            cost.activation_bits)


def describe(fmt: str, arch: str, *, weight_bits: float | None = None) -> str:
    kernels, w, a = cost_key(fmt, arch, weight_bits=weight_bits)
    return f"{fmt} W{w:g}A{a}{'' if kernels == 0 else f', no {arch} kernels'}"
