"""Representativeness: is the calibration sample a fair picture of the traffic it was drawn from? Answered after
calibrate and before quantize.

* **Token lengths**: two-sample Kolmogorov-Smirnov statistic and quantiles side by side, sample vs source. The
  source is the calibrate stage's uniform reference sample of it (request logs: ``reference_samples`` records,
  duplicates included, i.e. traffic-weighted; other sources: up to 10,000 distinct texts), tokenized exactly. For
  request logs the first-N slice a naive tool would have taken is shown too.
* **Strata**: each stratum's share of the source (request logs: counted over every usable record) vs of the sample.
* **Duplicates and drops**: the source's estimated exact-duplicate rate, near duplicates removed from the drawn
  candidates, records dropped by reason, redactions.
* **Activations** (needs the model; runs when ``max_activation_ratio`` is set or the source is request_log): each
  Linear layer's input abs-max, the statistic max calibration turns into activation scales (``lm_head`` excluded, as
  ModelOpt leaves it unquantized), over the calibration sample and over an equally large held-out sample of the
  same source, tokenized and batched like quantization (left padding, truncation to ``max_tokens``; padding
  positions masked out). The ratio between the two (larger / smaller) per layer, and the layers that differ most.
  Cached by model, calibration and holdout digests.

Thresholds in ``calibration.representativeness`` (``max_ks``, ``max_stratum_share_gap``, ``max_activation_ratio``)
turn a failed metric into a warning or, with ``action: stop``, a :class:`RepresentativenessError` raised before any
quantization, naming the metric, its value and the threshold.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.calibration.activation_ranges import LayerRange, cached_activation_ranges

log = logging.getLogger(__name__)

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
TOP_LAYERS = 10


class RepresentativenessError(RuntimeError):
    """The calibration set failed a representativeness threshold whose action is 'stop'."""


@dataclass(frozen=True)
class StratumRow:
    stratum: str
    source_count: int
    source_share: float
    sample_count: int
    sample_share: float
    gap: float  # sample share - source share
    first_n_share: float | None = None


@dataclass(frozen=True)
class Check:
    metric: str
    value: float
    threshold: float
    passed: bool
    what: str

    @property
    def message(self) -> str:
        op = "<=" if self.passed else ">"
        return (f"{self.metric} = {self.value:.4g} {op} calibration.representativeness.max_{self.metric} "
                f"{self.threshold:g} ({self.what})")


@dataclass(frozen=True)
class Report:
    source: str
    n_sample: int
    n_reference: int
    ks: float
    ks_pvalue: float
    quantiles: dict  # row (sample | source | first_n) -> {n, mean, p10, ..., max}
    strata: tuple[StratumRow, ...]
    stratum_share_gap: float  # the largest |gap|
    over_max_tokens_share: dict  # row -> share of texts longer than max_tokens (truncated by calibration)
    duplicates: dict  # duplicate and drop counts and rates
    first_n_ks: float | None = None
    first_n_stratum_share_gap: float | None = None
    layers: tuple[LayerRange, ...] = ()  # most different first
    activation_ratio: float | None = None  # the largest layer ratio
    checks: tuple[Check, ...] = ()
    action: str = "warn"
    cached: bool = False  # the activation part came from the store

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def status(self) -> str:
        """unchecked: no threshold is set, so nothing was judged (the numbers are still reported)."""
        if not self.checks:
            return "unchecked"
        return "pass" if not self.failed else self.action

    def metrics(self) -> dict[str, float]:
        values = {"ks": self.ks, "ks_pvalue": self.ks_pvalue, "stratum_share_gap": self.stratum_share_gap,
                  "activation_ratio": self.activation_ratio, "first_n_ks": self.first_n_ks,
                  "first_n_stratum_share_gap": self.first_n_stratum_share_gap,
                  "n_sample": self.n_sample, "n_reference": self.n_reference,
                  **{f"duplicates.{k}": v for k, v in self.duplicates.items()}}
        return {k: v for k, v in values.items() if isinstance(v, (int, float))}

    def strata_table(self) -> list[dict]:
        return [asdict(r) for r in self.strata]

    def layers_table(self, top: int | None = None) -> list[dict]:
        return [asdict(r) for r in self.layers[:top]]

    def as_dict(self) -> dict:
        return asdict(self) | {"status": self.status, "failed": [c.message for c in self.failed]}

    def summary(self) -> str:
        if not self.failed:
            return "calibration set is representative: " + "; ".join(c.message for c in self.checks) if self.checks \
                else ("calibration representativeness: unchecked (no thresholds set: calibration.representativeness."
                      "max_ks, max_stratum_share_gap or max_activation_ratio)")
        return ("calibration set is not representative of its source: "
                + "; ".join(c.message for c in self.failed))

    def markdown(self) -> str:
        return _markdown(self)


# ---------------------------------------------------------------------------------------------------------- statistics

def _natural(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", key) if p)


def _shares(strata) -> dict[str, float]:
    counts = pd.Series(list(strata), dtype=object).value_counts()
    total = counts.sum()
    return {k: float(v / total) for k, v in counts.items()} if total else {}


def _quantiles(tokens) -> dict:
    a = np.asarray(tokens, dtype=float)
    if not len(a):
        return {"n": 0}
    q = np.quantile(a, QUANTILES)
    return {"n": int(len(a)), "mean": round(float(a.mean()), 1),
            **{f"p{round(p * 100):d}": round(float(v), 1) for p, v in zip(QUANTILES, q)}, "max": int(a.max())}


def length_report(*, sample_tokens, sample_strata, reference_tokens, reference_strata,
                  source_strata: dict | None = None, first_n_tokens=(), first_n_strata=(),
                  duplicates: dict | None = None, max_tokens: int, source: str = "") -> Report:
    """The statistical part: the sample against the source (its reference sample, and its stratum counts if known)."""
    from scipy.stats import ks_2samp

    sample, reference, first = (np.asarray(x, dtype=float) for x in (sample_tokens, reference_tokens, first_n_tokens))
    if not len(sample) or not len(reference):
        raise ValueError("representativeness: the sample and the reference sample must not be empty")
    ks = ks_2samp(sample, reference)
    if source_strata:
        total = sum(source_strata.values())
        source_counts = dict(source_strata)
        source_shares = {k: v / total for k, v in source_strata.items()}
    else:
        source_shares = _shares(reference_strata)
        source_counts = pd.Series(list(reference_strata), dtype=object).value_counts().to_dict()
    sample_shares, first_shares = _shares(sample_strata), _shares(first_n_strata) if len(first) else {}
    sample_counts = pd.Series(list(sample_strata), dtype=object).value_counts().to_dict()
    rows = []
    for key in sorted(set(source_shares) | set(sample_shares), key=_natural):
        src, smp = source_shares.get(key, 0.0), sample_shares.get(key, 0.0)
        rows.append(StratumRow(key, int(source_counts.get(key, 0)), round(src, 5), int(sample_counts.get(key, 0)),
                               round(smp, 5), round(smp - src, 5),
                               round(first_shares.get(key, 0.0), 5) if len(first) else None))
    gap = max(abs(r.gap) for r in rows)
    first_gap = None
    if len(first):
        first_gap = max(abs(first_shares.get(k, 0.0) - source_shares.get(k, 0.0))
                        for k in set(source_shares) | set(first_shares))
    quantiles = {"sample": _quantiles(sample), "source": _quantiles(reference)}
    over = {"sample": float((sample > max_tokens).mean()), "source": float((reference > max_tokens).mean())}
    first_ks = None
    if len(first):
        quantiles["first_n"] = _quantiles(first)
        over["first_n"] = float((first > max_tokens).mean())
        first_ks = round(float(ks_2samp(first, reference).statistic), 5)
    return Report(source=source, n_sample=len(sample), n_reference=len(reference), ks=round(float(ks.statistic), 5),
                  ks_pvalue=float(ks.pvalue), quantiles=quantiles, strata=tuple(rows), stratum_share_gap=round(gap, 5),
                  over_max_tokens_share={k: round(v, 5) for k, v in over.items()}, duplicates=dict(duplicates or {}),
                  first_n_ks=first_ks, first_n_stratum_share_gap=None if first_gap is None else round(first_gap, 5))


def apply_thresholds(report: Report, thresholds) -> Report:
    """Attach a check per set threshold (a ``RepresentativenessSpec``) and the action a failure takes."""
    checks = []
    if thresholds.max_ks is not None:
        checks.append(Check("ks", report.ks, thresholds.max_ks, report.ks <= thresholds.max_ks,
                            "Kolmogorov-Smirnov statistic of token lengths, sample vs source"))
    if thresholds.max_stratum_share_gap is not None:
        worst = max(report.strata, key=lambda r: abs(r.gap))
        checks.append(Check("stratum_share_gap", report.stratum_share_gap, thresholds.max_stratum_share_gap,
                            report.stratum_share_gap <= thresholds.max_stratum_share_gap,
                            f"stratum '{worst.stratum}': {worst.sample_share:.1%} of the sample vs "
                            f"{worst.source_share:.1%} of the source"))
    if thresholds.max_activation_ratio is not None:
        if report.activation_ratio is None:
            raise ValueError("representativeness: max_activation_ratio is set but no activation ranges were computed")
        worst = report.layers[0]
        checks.append(Check("activation_ratio", report.activation_ratio, thresholds.max_activation_ratio,
                            report.activation_ratio <= thresholds.max_activation_ratio,
                            f"input abs-max of {worst.layer}: {worst.calibration_amax:.4g} on the calibration sample "
                            f"vs {worst.holdout_amax:.4g} on held-out requests"))
    return replace(report, checks=tuple(checks), action=thresholds.action)


def enforce(report: Report) -> list[str]:
    """Raise :class:`RepresentativenessError` when a check failed and the action is 'stop'; else return the
    failure messages (warnings)."""
    if report.failed and report.action == "stop":
        raise RepresentativenessError(report.summary() + " — stopped before quantization (calibration."
                                      "representativeness.action: stop; set action: warn to go on)")
    return [c.message for c in report.failed]


# ---------------------------------------------------------------------------------------------------------- assess

def load_inputs(calibration_dir: str | Path) -> dict:
    """What calibrate stored for the report: sample, reference sample, first-N slice, source summary."""
    d = Path(calibration_dir)
    packed = d / "sample_texts.parquet"  # packed sequences: compare the texts they were cut from
    calib = pd.read_parquet(packed if packed.is_file() else d / "calibration.parquet", columns=["n_tokens", "stratum"])
    reference = pd.read_parquet(d / "reference.parquet")
    first = pd.read_parquet(d / "first_n.parquet") if (d / "first_n.parquet").is_file() else None
    source = json.loads((d / "source.json").read_text()) if (d / "source.json").is_file() else {}
    return {"sample_tokens": calib["n_tokens"].tolist(), "sample_strata": calib["stratum"].tolist(),
            "reference_tokens": reference["n_tokens"].tolist(), "reference_strata": reference["stratum"].tolist(),
            "first_n_tokens": [] if first is None else first["n_tokens"].tolist(),
            "first_n_strata": [] if first is None else first["stratum"].tolist(),
            "source_strata": source.get("strata"), "duplicates": source.get("duplicates", {})}


def wants_activations(spec) -> bool:
    return spec.representativeness.max_activation_ratio is not None or spec.source == "request_log"


def assess(spec, calib, *, model_dir: str | None, model_fp: str | None, activations: bool | None = None) -> Report:
    """The report for a calibration artifact, thresholds applied (``spec`` is the recipe's CalibrationSpec).

    ``activations``: None runs the activation part when :func:`wants_activations` says so.
    """
    report = length_report(**load_inputs(calib.path), max_tokens=spec.max_tokens, source=spec.source)
    cached = False
    if activations if activations is not None else wants_activations(spec):
        rows, cached = cached_activation_ranges(model_dir=model_dir, model_fp=model_fp, calib=calib, spec=spec)
        if rows:
            report = replace(report, layers=rows, activation_ratio=rows[0].ratio)
    report = apply_thresholds(replace(report, cached=cached), spec.representativeness)
    log.info("%s", report.summary())
    return report


# ---------------------------------------------------------------------------------------------------------- rendering

def _pct(v) -> str:
    return "—" if v is None else f"{v:.1%}"


def _markdown(r: Report) -> str:
    lines = [f"# Calibration representativeness: {r.status.upper()}", "",
             f"Source `{r.source}`: sample of {r.n_sample} texts vs a reference sample of {r.n_reference} from the "
             f"source.", ""]
    if r.checks:
        lines += ["| metric | value | threshold | verdict |", "|---|---|---|---|"]
        lines += [f"| {c.metric} | {c.value:.4g} | {c.threshold:g} | {'pass' if c.passed else r.action} |"
                  for c in r.checks]
        lines += [""] + [f"- {c.message}" for c in r.failed] + [""]
    cols = ["n", "mean", *[f"p{round(p * 100):d}" for p in QUANTILES], "max"]
    lines += ["## Token lengths", "", "| | " + " | ".join(cols) + " | KS vs source | > max_tokens |",
              "|---" * (len(cols) + 3) + "|"]
    ks = {"sample": r.ks, "source": None, "first_n": r.first_n_ks}
    label = {"sample": "sample", "source": "source", "first_n": "first-N slice (naive)"}
    for row, q in r.quantiles.items():
        ks_cell = "—" if ks[row] is None else f"{ks[row]:.3f}"
        lines.append(f"| {label[row]} | " + " | ".join(str(q.get(c, "")) for c in cols)
                     + f" | {ks_cell} | {_pct(r.over_max_tokens_share.get(row))} |")
    lines += ["", "## Strata", "", "| stratum | source | sample | gap | first-N slice |", "|---|---|---|---|---|"]
    lines += [f"| {s.stratum} | {_pct(s.source_share)} | {_pct(s.sample_share)} | {s.gap:+.1%} "
              f"| {_pct(s.first_n_share)} |" for s in r.strata]
    first_gap = r.first_n_stratum_share_gap
    lines += ["", f"Largest share gap: {r.stratum_share_gap:.1%}"
              + (f" (first-N slice: {first_gap:.1%})" if first_gap is not None else "")]
    if r.layers:
        lines += ["", f"## Activation ranges (Linear input abs-max, calibration vs held-out; top {TOP_LAYERS})", "",
                  "| layer | calibration | held-out | ratio |", "|---|---|---|---|"]
        lines += [f"| {x.layer} | {x.calibration_amax:.4g} | {x.holdout_amax:.4g} | {x.ratio:.3f} |"
                  for x in r.layers[:TOP_LAYERS]]
    if r.duplicates:
        lines += ["", "## Duplicates, drops, redactions", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in r.duplicates.items()]
    return "\n".join(lines) + "\n"


def figure(r: Report, *, sample_tokens=None, reference_tokens=None, first_n_tokens=None):
    """A matplotlib figure: length CDFs (when the token lists are given), stratum shares, activation ratios."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = 2 + bool(r.layers)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True)
    ax = axes[0]
    if sample_tokens is not None and reference_tokens is not None:
        for label, data in (("source", reference_tokens), ("sample", sample_tokens), ("first-N slice", first_n_tokens)):
            if data is not None and len(data):
                x = np.sort(np.asarray(data))
                ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)
        ax.set_xscale("log")
        ax.set_title(f"token lengths (KS {r.ks:.3f})")
        ax.set_xlabel("tokens")
        ax.set_ylabel("cumulative share")
    else:
        rows = list(r.quantiles)
        for label in rows:
            q = r.quantiles[label]
            keys = [k for k in q if k.startswith("p")]
            ax.plot([float(k[1:]) for k in keys], [q[k] for k in keys], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_title(f"token-length quantiles (KS {r.ks:.3f})")
        ax.set_xlabel("percentile")
        ax.set_ylabel("tokens")
    ax.legend()
    ax = axes[1]
    idx = np.arange(len(r.strata))
    series = [("source", [s.source_share for s in r.strata]), ("sample", [s.sample_share for s in r.strata])]
    if r.strata and r.strata[0].first_n_share is not None:
        series.append(("first-N slice", [s.first_n_share for s in r.strata]))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar(idx + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(idx, [s.stratum for s in r.strata], rotation=60, ha="right", fontsize=7)
    ax.set_title(f"stratum shares (largest gap {r.stratum_share_gap:.1%})")
    ax.legend()
    if r.layers:
        ax = axes[2]
        top = r.layers[:20]
        ax.barh(range(len(top)), [x.ratio - 1 for x in top], left=1)
        ax.set_yticks(range(len(top)), [x.layer for x in top], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("input abs-max ratio, calibration vs held-out")
        ax.set_title(f"activation ranges (largest ratio {r.activation_ratio:.2f})")
    fig.suptitle(f"calibration representativeness: {r.status}")
    return fig
