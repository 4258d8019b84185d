"""The decision report: per target, accuracy cost vs serving speed for every rung, latency against the SLOs, and
the decision with its reason. Markdown with PNG plots, written next to the run's other outputs, plus the same report
as one self-contained HTML file (plots embedded), which MLflow's artifact view shows with its images."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def _pareto_plot(target: str, rows: list[dict], load: str, tolerance: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        v = next((v for v in row.get("verdicts", []) if v["gate"] == "holdout_perplexity"), None)
        speed = row.get("latency", {}).get(load, {}).get("output_tokens_per_s")
        if speed is None:
            continue
        y = 0.0 if row["format"] == "none" else (v or {}).get("value")
        if y is None:
            continue
        bound = (v or {}).get("bound") or y
        color = {"pass": "tab:green", "fail": "tab:red", "undecided": "tab:orange"}.get(row["status"], "tab:gray")
        ax.errorbar(speed, 100 * y, yerr=[[0], [100 * (bound - y)]], fmt="o", color=color, capsize=4)
        ax.annotate(row["format"], (speed, 100 * y), textcoords="offset points", xytext=(6, 4))
    if tolerance is not None:
        ax.axhline(100 * tolerance, color="tab:red", linestyle="--", label=f"tolerance {tolerance:.0%}")
        ax.legend()
    ax.set_xlabel(f"output tokens/s ({load})")
    ax.set_ylabel("perplexity increase vs baseline, % (bar: upper bound)")
    ax.set_title(f"{target}: accuracy cost vs serving speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _latency_plot(target: str, rows: list[dict], load: str, slos: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("ttft", "tpot")):
        for row in rows:
            summary = row.get("latency", {}).get(load, {})
            points = [(p, summary.get(f"{metric}_ms_p{p}")) for p in (50, 90, 95, 99)]
            points = [(p, v) for p, v in points if v is not None]
            if points:
                ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=row["format"])
        slo = slos.get(f"{metric}_p95_ms")
        if slo:
            ax.axhline(slo, color="tab:red", linestyle="--", label=f"SLO p95 {slo:g} ms")
        ax.set_xlabel("percentile")
        ax.set_ylabel(f"{metric.upper()} ms")
        ax.set_title(f"{target}: {metric.upper()} at {load}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _host(summary: dict) -> str:
    host = summary.get("host_load") or {}
    if not host:
        return ""
    load = f"load {host.get('load_1m_mean', 0):.1f}, others {host.get('foreign_cpu_cores_mean', 0):.1f} cores"
    return load if host.get("reliable") else f"**{host.get('note', 'unreliable')}** ({load})"


def _recovery_lines(rows: list[dict]) -> list[str]:
    """One line per recovery rung: what it recovered from, its budget or training config, its loss curve, its time."""
    out = []
    for r in rows:
        rec = r.get("recovery")
        if not rec:
            continue
        cfg, curve = rec.get("config", {}), rec.get("loss_curve") or []
        if rec["recovery_method"] == "auto_quantize":
            how = (f"AutoQuantize over {cfg.get('candidates')} under {cfg.get('effective_bits_budget')} "
                   f"effective bits: "
                   f"reached {cfg.get('effective_bits')} bits, layers {cfg.get('layer_formats')}")
        else:
            how = (f"distilled from the unquantized model for {cfg.get('steps')} steps (lr {cfg.get('lr')}, "
                   f"{cfg.get('batch_size')}x{cfg.get('seq_len')} tokens, {cfg.get('texts')} non-held-out texts); "
                   f"KL {curve[0]:.4f} → {curve[-1]:.4f}" if curve else "")
        out.append(f"- **{r['format']}** (recovery rung after {rec['recovered_from']} failed its accuracy gate): "
                   f"{how}; {rec.get('seconds', 0):.0f} s; {r['status']}")
    return ["", "Recovery rungs:", *out] if out else []


def write_report(*, recipe, rows: list[dict], decisions: dict[str, dict], out_dir: Path) -> Path:
    """Write report.md and one pair of PNGs per target into out_dir; returns the Markdown file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    load = recipe.gated_load
    ppl_gate = recipe.gates.accuracy.tasks.get("holdout_perplexity")
    tolerance = ppl_gate.max_relative_increase if ppl_gate else None
    slos = recipe.gates.latency.model_dump()
    lines = [f"# Decision report: {recipe.name}", "",
             f"Ladder strategy `{recipe.ladder.strategy}` (metric `{recipe.ladder.metric}`); "
             f"latency gates at `{load}`; "
             f"accuracy gates: one-sided {recipe.gates.accuracy.confidence:.0%} paired-bootstrap bound "
             f"within tolerance.", ""]
    for target in dict.fromkeys(r["target"] for r in rows):
        trows = [r for r in rows if r["target"] == target]
        decision = decisions.get(target, {})
        lines += [f"## Target `{target}` ({trows[0]['arch']})", "",
                  f"**Decision:** {decision.get('format') or 'nothing promoted'} — {decision.get('reason', '')}", ""]
        if decision.get("latency_note"):
            lines += [f"**Latency did not decide:** {decision['latency_note']}. The latency columns and plots below "
                      "are the reference runtime's speed, shown for information.", ""]
        if reduced := next((r["latency_load"] for r in trows if r.get("latency_load")), None):
            lines += [f"**Latency load:** {reduced}.", ""]
        lines += ["| format | status | perplexity Δ (bound) | cloze Δ (bound) | TTFT p50/p95 ms | TPOT p50/p95 ms "
                  "| tok/s | host load | reason |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in trows:
            v = {x["gate"]: x for x in r.get("verdicts", [])}
            lat = r.get("latency", {}).get(load, {})

            def cell(gate, pct):
                x = v.get(gate)
                if not x or x["value"] is None:
                    return ""
                return f"{x['value']:+.2%} (≤{x['bound']:+.2%})" if pct else f"{x['value']:+.3f} (≤{x['bound']:+.3f})"

            def num(key):
                return "" if lat.get(key) is None else f"{lat[key]:.1f}"

            if lat.get("not_measured"):  # no decision could use it (e.g. its accuracy gate had already failed)
                speed = f"not measured: {lat['not_measured']} | | | |"
            else:
                speed = (f"{num('ttft_ms_p50')}/{num('ttft_ms_p95')} | {num('tpot_ms_p50')}/{num('tpot_ms_p95')} | "
                         f"{num('output_tokens_per_s')} | {_host(lat)} |")
            lines.append(f"| {r['format']} | {r['status']} | {cell('holdout_perplexity', True)} | "
                         f"{cell('holdout_cloze', False)} | {speed} "
                         f"{r.get('reason', '') if r['status'] not in ('pass', 'baseline') else ''} |")
        lines += _recovery_lines(trows)
        measured = [r for r in trows if r.get("latency")]
        if measured:
            pareto, latency = out_dir / f"{target}-pareto.png", out_dir / f"{target}-latency.png"
            _pareto_plot(target, measured, load, tolerance, pareto)
            _latency_plot(target, measured, load, slos, latency)
            lines += ["", f"![accuracy vs speed]({pareto.name})", "", f"![latency percentiles]({latency.name})"]
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    write_html(path)
    return path


def inline_images(markdown: str, base_dir: Path) -> str:
    """The Markdown with each local PNG embedded as a data URI, for viewers that cannot fetch files stored next to
    it (a Prefect artifact, an MLflow HTML artifact)."""
    def embed(match: re.Match) -> str:
        png = Path(base_dir) / match.group(2)
        if not png.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"
    return IMAGE_LINK.sub(embed, markdown)


def write_html(markdown_file: Path) -> Path:
    """report.html beside report.md: the same report, self-contained."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(inline_images(markdown_file.read_text(),
                                                                          markdown_file.parent))
    title = html.escape(markdown_file.read_text().splitlines()[0].lstrip("# "))
    out = markdown_file.with_suffix(".html")
    out.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
img {{ max-width: 100%; }}
</style></head><body>{body}</body></html>""")
    return out
