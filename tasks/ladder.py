"""The fallback ladder: which format a target should serve, given every rung's gate outcome and measurements.

Rungs are the recipe's formats, most aggressive first, pruned by architecture validity.
  - first_passing: evaluate in order and stop at the first rung that passes every gate;
  - best_measured: evaluate every rung and pick the passing one with the best measured serving metric.
If no rung passes, nothing is chosen and every rung's reason is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

HIGHER_IS_BETTER = {"output_tokens_per_s": True, "ttft_ms_p95": False, "tpot_ms_p95": False}


@dataclass(frozen=True)
class Choice:
    format: str | None
    reason: str


def keep_going(strategy: str, statuses: list[str]) -> bool:
    """Whether the next rung needs evaluating."""
    return strategy == "best_measured" or "pass" not in statuses


def choose(rungs: list[dict], *, strategy: str, metric: str) -> Choice:
    """rungs: dicts with format, status (pass/fail/undecided/skipped), reason, and the gated load's latency summary."""
    passing = [r for r in rungs if r["status"] == "pass"]
    if not passing:
        why = "; ".join(f"{r['format']}: {r['status']} ({r['reason']})" for r in rungs) or "no valid rung"
        return Choice(None, f"no format passed every gate: {why}")
    if strategy == "first_passing":
        return Choice(passing[0]["format"], f"{passing[0]['format']} is the most aggressive format that passed every gate")
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    measured = [r for r in passing if r["latency"].get(metric) is not None]
    if not measured:
        return Choice(None, f"no passing format has a measured {metric}")
    best = max(measured, key=lambda r: sign * r["latency"][metric])
    others = ", ".join(f"{r['format']} {r['latency'][metric]:.1f}" for r in measured if r is not best)
    return Choice(best["format"], f"{best['format']} has the best {metric} among passing formats "
                                  f"({best['latency'][metric]:.1f}{'; ' + others if others else ''})")


def rank_key(tags: dict, *, strategy: str, metric: str, format_cost: dict) -> tuple:
    """Smaller is better: how a new version is compared with the current champion on the same arch."""
    degradation = float(tags.get("accuracy_degradation") or "inf")
    if strategy == "first_passing":
        return (format_cost.get(tags.get("quant_format", ""), 8), degradation)
    value = tags.get(f"metric.{metric}")
    if value is None:
        return (float("inf"), degradation)
    return ((-1 if HIGHER_IS_BETTER[metric] else 1) * float(value), degradation)
