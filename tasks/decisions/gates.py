"""Gates: decide from the numbers, with their uncertainty, whether a candidate may be promoted.

Accuracy gates compare candidate and baseline on the same items (paired bootstrap over items):
  - pass       when the one-sided upper confidence bound of the degradation is within the tolerance;
  - fail       when the bound exceeds the tolerance and the items resolve it;
  - undecided  when the interval is wider than the tolerance itself (too few items to decide at that tolerance).
Degradation is the relative word-perplexity increase for perplexity tasks, the absolute score drop otherwise.
Latency gates are SLOs on percentiles and a minimum speedup over the baseline on the same target. They decide only
where the speed is a deployment number (the backend says so) or the recipe opts in
(`gates.latency.on_reference_runtime`); elsewhere they are computed and reported with `decides=False`.
A candidate passes when every gate passes; any failure fails it; otherwise any undecided gate leaves it undecided.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd

from recipes.schema import GatesSpec, LatencySpec


@dataclass(frozen=True)
class GateVerdict:
    gate: str
    baseline: float | None
    candidate: float | None
    value: float | None  # the gated quantity: degradation, percentile, or speedup
    bound: float | None  # one-sided upper bound of the degradation (accuracy gates)
    threshold: float
    n: int | None
    verdict: str  # pass | fail | undecided
    reason: str
    decides: bool = True  # False: reported only (latency measured on a runtime whose speed is not a deployment's)
    kind: str = ""  # perplexity | score | latency: how `value` relates to candidate - baseline (see delta())
    not_deciding: str = ""  # why it does not decide (decides=False)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    status: str  # pass | fail | undecided
    verdicts: list[GateVerdict]

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    @property
    def reason(self) -> str:
        bad = [v for v in self.verdicts if v.verdict != "pass" and v.decides]
        return "; ".join(f"{v.gate}: {v.reason}" for v in bad) or "all gates passed"


def _paired(baseline: pd.DataFrame, candidate: pd.DataFrame, task: str) -> pd.DataFrame:
    b = baseline[baseline.task == task].set_index("doc_id")
    c = candidate[candidate.task == task].set_index("doc_id")
    return b.join(c, lsuffix="_b", rsuffix="_c", how="inner")


def degradation_samples(pairs: pd.DataFrame, kind: str, *, resamples: int, seed: int) -> tuple[float, np.ndarray]:
    """Point estimate and bootstrap distribution of the degradation over resampled item indices."""
    n = len(pairs)
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    if kind == "perplexity":
        ll_b, ll_c, words = (pairs[c].to_numpy(float) for c in ("loglikelihood_b", "loglikelihood_c", "words_b"))
        point = float(np.expm1((ll_b.sum() - ll_c.sum()) / words.sum()))
        boot = np.expm1((ll_b[idx].sum(1) - ll_c[idx].sum(1)) / words[idx].sum(1))
    else:
        diff = pairs["score_b"].to_numpy(float) - pairs["score_c"].to_numpy(float)
        point = float(diff.mean())
        boot = diff[idx].mean(1)
    return point, boot


def accuracy_verdict(task: str, pairs: pd.DataFrame, *, tolerance: float, kind: str, confidence: float,
                     resamples: int, seed: int = 0) -> GateVerdict:
    n = len(pairs)
    label = "relative perplexity increase" if kind == "perplexity" else "score drop"
    if n < 2:
        return GateVerdict(task, None, None, None, None, tolerance, n, "undecided", f"only {n} paired item(s)",
                           kind=kind)
    point, boot = degradation_samples(pairs, kind, resamples=resamples, seed=seed)
    upper = float(np.quantile(boot, confidence))
    lower = float(np.quantile(boot, 1 - confidence))
    if kind == "perplexity":
        base = float(np.exp(-pairs["loglikelihood_b"].sum() / pairs["words_b"].sum()))
        cand = float(np.exp(-pairs["loglikelihood_c"].sum() / pairs["words_b"].sum()))
    else:
        base, cand = float(pairs["score_b"].mean()), float(pairs["score_c"].mean())
    stated = f"{label} {point:+.4f}, {confidence:.0%} upper bound {upper:+.4f}, tolerance {tolerance:.4f}, n={n}"
    if upper <= tolerance:
        verdict, reason = "pass", f"{stated}: bound within tolerance"
    elif lower > tolerance:
        verdict, reason = "fail", f"{stated}: degradation exceeds tolerance even at the lower bound {lower:+.4f}"
    elif upper - point > tolerance:
        verdict, reason = "undecided", (f"{stated}: {n} items cannot resolve a tolerance of {tolerance:.4f} "
                                        f"(interval half-width {upper - point:.4f}); raise evaluation.limit")
    else:
        verdict, reason = "fail", f"{stated}: bound exceeds tolerance"
    return GateVerdict(task, base, cand, point, upper, tolerance, n, verdict, reason, kind=kind)


def accuracy_verdicts(baseline_items: pd.DataFrame, candidate_items: pd.DataFrame,
                      gates: GatesSpec) -> list[GateVerdict]:
    verdicts = []
    for task, gate in gates.accuracy.tasks.items():
        kind = "perplexity" if gate.max_relative_increase is not None else "score"
        tolerance = gate.max_relative_increase if kind == "perplexity" else gate.max_drop
        pairs = _paired(baseline_items, candidate_items, task)
        verdicts.append(accuracy_verdict(task, pairs, tolerance=tolerance, kind=kind,
                                         confidence=gates.accuracy.confidence, resamples=gates.accuracy.bootstrap))
    return verdicts


NOT_MEASURED = "not measured"
ACCURACY_FAILED = "accuracy failed"


def latency_verdicts(baseline: dict, candidate: dict, gates: GatesSpec) -> list[GateVerdict]:
    """One verdict per latency gate. A candidate whose latency was not measured (its summary carries
    `not_measured`: why) gets verdicts "not measured: <why>" that do not decide."""
    if candidate.get("not_measured"):
        why = f"{NOT_MEASURED}: {candidate['not_measured']}"
        names = [n for n in ("ttft_p95_ms", "tpot_p95_ms") if getattr(gates.latency, n) is not None]
        names += ["min_speedup"] if gates.latency.min_speedup is not None else []
        return [GateVerdict(n, None, None, None, None, getattr(gates.latency, n), None, NOT_MEASURED, why,
                            decides=False, kind="latency", not_deciding=why) for n in names]
    verdicts = []
    slos = {"ttft_p95_ms": "ttft_ms_p95", "tpot_p95_ms": "tpot_ms_p95"}
    for gate_name, key in slos.items():
        limit = getattr(gates.latency, gate_name)
        if limit is None:
            continue
        value = candidate.get(key)
        ok = value is not None and value <= limit
        verdicts.append(GateVerdict(gate_name, baseline.get(key), value, value, None, limit, candidate.get("requests"),
                                    "pass" if ok else "fail", f"{key} {_ms(value)} vs SLO {limit:.1f} ms",
                                    kind="latency"))
    if gates.latency.min_speedup is not None:
        b, c = baseline.get("output_tokens_per_s"), candidate.get("output_tokens_per_s")
        speedup = c / b if b and c else None
        ok = speedup is not None and speedup >= gates.latency.min_speedup
        verdicts.append(GateVerdict("min_speedup", b, c, speedup, None, gates.latency.min_speedup,
                                    candidate.get("requests"), "pass" if ok else "fail",
                                    f"output tokens/s {_num(c)} vs baseline {_num(b)}: speedup "
                                    f"{'not measured' if speedup is None else f'{speedup:.2f}x'}, "
                                    f"minimum {gates.latency.min_speedup:.2f}x", kind="latency"))
    return verdicts


def _num(value) -> str:
    return "not measured (no request succeeded)" if value is None else f"{value:.1f}"


def _ms(value) -> str:
    return "not measured (no request succeeded)" if value is None else f"{value:.1f} ms"


def latency_note(backend, gates: GatesSpec) -> str | None:
    """Why latency may not decide on a target of this backend, or None when it may (the backend declares whether
    its speed is a deployment number: `SPEED_IS_DEPLOYMENT`, `SPEED_LABEL`)."""
    if backend.SPEED_IS_DEPLOYMENT or gates.latency.on_reference_runtime:
        return None
    return (f"{backend.SPEED_LABEL}; measured and reported, not gated or ranked "
            "(gates.latency.on_reference_runtime: true lets it decide)")


def accuracy_failed(decision: Decision) -> bool:
    """A PTQ rung whose accuracy gate (not latency) failed: the trigger for recovery."""
    return any(v.bound is not None and v.verdict == "fail" and v.decides for v in decision.verdicts)


def latency_tags(note: str | None, summary: dict) -> dict:
    """What a run or registry version records about its latency numbers: whether they decide, the conditions they
    were measured under, and the host's load then (compared before two versions' speeds are)."""
    host = summary.get("host_load") or {}
    return {"latency_decides": "false" if note else "true", "latency_note": note or "deployment runtime",
            "latency_reliable": str(summary.get("host_reliable")).lower(),
            "latency_conditions": summary.get("conditions"), "latency_host_load": host.get("note", "not recorded")}


def decide(verdicts: list[GateVerdict]) -> Decision:
    states = {v.verdict for v in verdicts if v.decides}
    status = "fail" if "fail" in states else "undecided" if "undecided" in states else "pass"
    return Decision(status, verdicts)


def gate(*, baseline_items_file: str, candidate_items_file: str, baseline_latency: dict, candidate_latency: dict,
         gates: GatesSpec, latency_note: str | None = None) -> Decision:
    """All of a candidate's gate verdicts and the combined decision. Cheap; never cached.

    latency_note: why latency may not decide here (see :func:`latency_note`); its verdicts are then reported only.
    """
    base, cand = pd.read_parquet(baseline_items_file), pd.read_parquet(candidate_items_file)
    latency = latency_verdicts(baseline_latency, candidate_latency, gates)
    if latency_note:
        latency = [v if v.verdict == NOT_MEASURED else
                   replace(v, decides=False, not_deciding=latency_note,
                           reason=f"{v.reason} (not deciding: {latency_note})") for v in latency]
    return decide(accuracy_verdicts(base, cand, gates) + latency)


def latency_not_needed(*, baseline_items_file: str, candidate_items_file: str, gates: GatesSpec) -> str | None:
    """Why a candidate's latency need not be measured (its accuracy gates already fail it, so no decision can use
    its speed), or None. The gate task still runs afterwards and records every verdict."""
    base, cand = pd.read_parquet(baseline_items_file), pd.read_parquet(candidate_items_file)
    return ACCURACY_FAILED if decide(accuracy_verdicts(base, cand, gates)).status == "fail" else None


def latency_load(spec: LatencySpec, gates: GatesSpec, latency_note: str | None) -> tuple[LatencySpec, str | None]:
    """The load to measure latency with, and a note when it is reduced. Where latency decides (latency_note is
    None) or the recipe asks (`latency.full_on_reference`), the recipe's full load. Elsewhere (the reference
    runtime, whose speed only informs) the smallest load that still fills the report: the gated concurrency only
    (the report's columns, the gates' and the ladder's numbers are read there), at most 3 measured requests (p50 and
    p95 exist) after at most 1 warm-up request."""
    if latency_note is None or spec.full_on_reference:
        return spec, None
    level = gates.latency.at_concurrency or max(spec.concurrency)
    small = spec.model_copy(update={"concurrency": [level], "request_rates": [], "requests": min(spec.requests, 3),
                                    "warmup": min(spec.warmup, 1)})
    if small == spec:
        return spec, None
    return small, (f"reduced load on a runtime whose speed does not decide: concurrency={level} only, "
                   f"{small.requests} requests after {small.warmup} warm-up (recipe: concurrency {spec.concurrency}, "
                   f"rates {spec.request_rates}, {spec.requests} requests; latency.full_on_reference: true "
                   "measures it all)")


# How every place (CLI table, report, MLflow tags and metrics, version description) states a verdict and a delta:
# one function each, so they cannot disagree. Verdicts may be GateVerdicts or their as_dict() form (run records).
# Sign convention: a delta is candidate - baseline, in the metric's own direction (perplexity: relative change of
# word perplexity, + is worse; a score such as cloze accuracy: absolute change, - is worse). A gate's `value` is the
# degradation (+ is worse for both), so a score's delta is -value and its worst case is -bound.

_DEFAULTS = {"decides": True, "kind": "", "not_deciding": ""}


def _get(v, key):
    return v.get(key, _DEFAULTS.get(key)) if isinstance(v, dict) else getattr(v, key)


def _kind(v) -> str:
    """The verdict's kind; a record written before verdicts carried one: an accuracy gate has a bound."""
    kind = _get(v, "kind")
    if kind or _get(v, "bound") is None:
        return kind
    return "perplexity" if "perplexity" in str(_get(v, "gate")) else "score"


def verdict_label(v) -> str:
    """pass | fail | undecided, or `not deciding: <why>` for a gate that is reported only (never "fail")."""
    if not _get(v, "decides"):
        return f"not deciding: {_get(v, 'not_deciding') or 'reported only'}"
    return _get(v, "verdict")


def deciding_pass(v) -> bool | None:
    """1/0 for MLflow's `gate.<g>.pass`; None (no metric) for a gate that does not decide."""
    return (_get(v, "verdict") == "pass") if _get(v, "decides") else None


def delta(v) -> tuple[float | None, float | None]:
    """(candidate - baseline, its worst case at the gate's confidence) for an accuracy gate; (None, None) else."""
    kind, value, bound = _kind(v), _get(v, "value"), _get(v, "bound")
    if value is None or kind not in ("perplexity", "score"):
        return None, None
    sign = 1.0 if kind == "perplexity" else -1.0
    return sign * value, None if bound is None else sign * bound


def delta_text(v, *, with_bound: bool = True) -> str:
    """e.g. `+2.1% (≤ +4.3%)` for perplexity, `-0.020 (≥ -0.051)` for a score; "" when there is none."""
    d, worst = delta(v)
    if d is None:
        return ""
    pct = _kind(v) == "perplexity"
    text = f"{d:+.1%}" if pct else f"{d:+.3f}"
    if with_bound and worst is not None:
        text += f" (≤ {worst:+.1%})" if pct else f" (≥ {worst:+.3f})"
    return text


def human(x) -> str:
    """A number as a person reads it: 15245.5, 0.0213, 2000 (never 17 digits)."""
    if x is None:
        return "none"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"


def statement(v) -> str:
    """One gate, in words: `holdout_cloze pass: Δ -0.020 (≥ -0.051), tolerance 0.1, n=100`."""
    d = delta_text(v)
    if d:
        what = f"Δ {d}"
    else:
        what = f"value {human(_get(v, 'value'))}"
    n = _get(v, "n")
    return (f"{_get(v, 'gate')} {verdict_label(v)}: {what}, threshold {human(_get(v, 'threshold'))}"
            + (f", n={n}" if n is not None else ""))
