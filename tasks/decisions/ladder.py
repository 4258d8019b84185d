"""The fallback ladder: which format a target should serve, given every rung's gate outcome and measurements.

Rungs are the recipe's formats, most aggressive first, pruned by architecture validity.
  - first_passing: evaluate in order and stop at the first rung that passes every gate;
  - best_measured: evaluate every rung and pick the passing one with the best measured serving metric.
Speed ranks only where it is a deployment number (or the recipe opted in): otherwise best_measured ranks passing
rungs by serving cost (tasks/decisions/serving_cost.py) and says why. If no rung passes, nothing is chosen and every
rung's reason is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.decisions.serving_cost import cost_key, describe

HIGHER_IS_BETTER = {"output_tokens_per_s": True, "ttft_ms_p95": False, "tpot_ms_p95": False}


@dataclass(frozen=True)
class Choice:
    format: str | None
    reason: str


def keep_going(strategy: str, statuses: list[str]) -> bool:
    """Whether the next rung needs evaluating."""
    return strategy == "best_measured" or "pass" not in statuses


def _cost(rung: dict, arch: str) -> tuple:
    return cost_key(rung.get("cost_format", rung["format"]), arch, weight_bits=rung.get("weight_bits"))


def choose(rungs: list[dict], *, strategy: str, metric: str, arch: str = "", speed_note: str | None = None) -> Choice:
    """rungs: dicts with format, status (pass/fail/undecided/skipped), reason, and the gated load's latency summary
    (recovery rungs add cost_format and weight_bits). speed_note: why measured speed may not decide here (None: it
    may)."""
    passing = [r for r in rungs if r["status"] == "pass"]
    if not passing:
        why = "; ".join(f"{r['format']}: {r['status']} ({r['reason']})" for r in rungs) or "no valid rung"
        return Choice(None, f"no format passed every gate: {why}")
    busy = [r for r in passing if r["latency"].get("host_reliable") is False]
    if strategy == "best_measured" and not speed_note and busy:
        speed_note = "; ".join(f"{r['format']} was measured on a busy host "
                               f"({r['latency'].get('host_load', {}).get('note', '')})" for r in busy)
    not_deciding = f"; latency did not decide: {speed_note}" if speed_note else ""
    if strategy == "first_passing":
        return Choice(passing[0]["format"],
                      f"{passing[0]['format']} is the most aggressive format that passed every gate{not_deciding}")
    if speed_note:
        best = min(passing, key=lambda r: _cost(r, arch))
        costs = ", ".join(describe(r.get("cost_format", r["format"]), arch, weight_bits=r.get("weight_bits"))
                          for r in sorted(passing, key=lambda r: _cost(r, arch)))
        return Choice(best["format"], f"{best['format']} has the lowest serving cost among passing formats "
                                      f"({costs}){not_deciding}")
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    measured = [r for r in passing if r["latency"].get(metric) is not None]
    if not measured:
        return Choice(None, f"no passing format has a measured {metric}")
    best = max(measured, key=lambda r: sign * r["latency"][metric])
    others = ", ".join(f"{r['format']} {r['latency'][metric]:.1f}" for r in measured if r is not best)
    return Choice(best["format"], f"{best['format']} has the best {metric} among passing formats "
                                  f"({best['latency'][metric]:.1f}{'; ' + others if others else ''})")


def speed_incomparable(candidate: dict, champion: dict, metric: str) -> str | None:
    """Why two registry versions' speeds cannot be compared, or None: both must be deployment numbers (or opted in),
    measured on the same target kind under the same load profile and request shape, on a quiet host."""
    for who, tags in (("candidate", candidate), ("champion", champion)):
        if tags.get("latency_decides") != "true":
            return f"the {who}'s latency does not decide ({tags.get('latency_note') or 'not recorded'})"
        if tags.get("latency_reliable") != "true":
            return f"the {who} was measured on a busy host ({tags.get('latency_host_load') or 'load not recorded'})"
        if tags.get(f"metric.{metric}") in (None, "None"):
            return f"the {who} has no measured {metric}"
    if candidate.get("latency_conditions") != champion.get("latency_conditions"):
        return (f"measured under different conditions ({candidate.get('latency_conditions')} vs "
                f"{champion.get('latency_conditions')})")
    return None


def _tag_cost(tags: dict) -> tuple:
    bits = tags.get("weight_bits")
    return cost_key(tags.get("cost_format") or tags.get("quant_format", ""), tags.get("gpu_arch", ""),
                    weight_bits=float(bits) if bits not in (None, "None") else None)


def compare_versions(candidate: dict, champion: dict, *, strategy: str, metric: str) -> tuple[bool, str]:
    """Whether a new version (its registry tags) beats the current champion on the same arch, and why."""
    degradation = lambda t: float(t.get("accuracy_degradation") or "inf")  # noqa: E731
    if strategy == "best_measured":
        why_not = speed_incomparable(candidate, champion, metric)
        if why_not is None:
            sign = -1 if HIGHER_IS_BETTER[metric] else 1
            key = lambda t: (sign * float(t[f"metric.{metric}"]), degradation(t))  # noqa: E731
            return key(candidate) < key(champion), f"{metric} compared under the same measurement conditions"
        fallback = f"speed not compared ({why_not}); ranked by serving cost, then accuracy loss"
    else:
        fallback = "ranked by serving cost, then accuracy loss"
    key = lambda t: (_tag_cost(t), degradation(t))  # noqa: E731
    return key(candidate) < key(champion), fallback
