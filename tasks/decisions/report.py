"""The decision report: per target, accuracy cost vs serving speed for every rung, latency against the SLOs, and
the decision with its reason. Markdown with PNG plots, written next to the run's other outputs, plus the same report
as one self-contained HTML file (plots embedded), which MLflow's artifact view shows with its images."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from tasks.decisions import gates

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

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.6))  # 935 px: fits a ~1000 px pane
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


STATUS_WORDS = {"pass": "passed", "fail": "rejected", "undecided": "undecided", "baseline": "baseline"}


def target_outcomes(rows: list[dict], decisions: dict[str, dict], promotions: list[dict] | None) -> dict[str, dict]:
    """Per target: the chosen format, its version, alias and `models:/` URIs (None where nothing was promoted) and
    why each other evaluated rung lost. What the parent run's tags and description, the flow run's message and the
    report's header all say."""
    out = {}
    for target, decision in decisions.items():
        promo = next((p for p in promotions or [] if p.get("target") == target), None)
        losers = [f"{r['format']} {STATUS_WORDS.get(r['status'], r['status'])}: {r.get('reason', '')}"
                  for r in rows if r["target"] == target and r["status"] in ("fail", "undecided")]
        out[target] = {"format": decision.get("format"), "reason": decision.get("reason", ""),
                       "latency_note": decision.get("latency_note"),
                       "registered_model": promo and promo.get("registered_model"),
                       "version": promo and str(promo.get("version")), "alias": promo and promo.get("alias"),
                       "action": promo and promo.get("action"),
                       "model_uri": promo and (promo.get("model_uri")
                                               or f"models:/{promo['registered_model']}/{promo['version']}"),
                       "alias_uri": promo and (promo.get("alias_uri")
                                               or f"models:/{promo['registered_model']}@{promo['alias']}"),
                       "losers": losers}
    return out


def outcome_line(target: str, o: dict) -> str:
    """`local: fp8 → smollm2-135m-reference v1, alias champion-cpu-x86-64 (moved)`, or why nothing was."""
    if o["format"] is None:
        return f"{target}: nothing certified"
    if not o["version"]:
        return f"{target}: {o['format']} chosen, not registered"
    return (f"{target}: {o['format']} → {o['registered_model']} v{o['version']}, alias {o['alias']} "
            f"({o['action']})")


def decision_tags(outcomes: dict[str, dict]) -> dict:
    """The parent run's tags: `decision.<target>` and its version, alias and URI."""
    tags = {}
    for target, o in outcomes.items():
        tags[f"decision.{target}"] = outcome_line(target, o).split(": ", 1)[1]
        if o["version"]:
            tags |= {f"decision.{target}.format": o["format"], f"decision.{target}.version": o["version"],
                     f"decision.{target}.alias": o["alias"], f"decision.{target}.model_uri": o["alias_uri"],
                     f"decision.{target}.version_uri": o["model_uri"]}
    return tags


def decision_markdown(recipe_name: str, outcomes: dict[str, dict]) -> str:
    """The parent run's description (`mlflow.note.content`): the decision first, why the others lost below."""
    lines = [f"**Decision** (recipe `{recipe_name}`)", ""]
    for target, o in outcomes.items():
        lines.append(f"- **{outcome_line(target, o)}**"
                     + (f"; load with `{o['alias_uri']}`" if o["alias_uri"] else ""))
        lines.append(f"  - why: {o['reason']}")
        lines += [f"  - {loser}" for loser in o["losers"]]
        if o["latency_note"]:
            lines.append(f"  - latency did not decide: {o['latency_note']}")
    return "\n".join(lines)


def _header(recipe, rows, decisions, run_id, promotions, outcomes) -> list[str]:
    import time

    acc = recipe.gates.accuracy
    tolerances = ", ".join(f"{task} {'relative increase' if g.max_relative_increase is not None else 'drop'} ≤ "
                           f"{g.max_relative_increase if g.max_relative_increase is not None else g.max_drop:g}"
                           for task, g in acc.tasks.items())
    slos = ", ".join(f"{k} ≤ {v:g}" for k, v in recipe.gates.latency.model_dump().items()
                     if k in ("ttft_p95_ms", "tpot_p95_ms", "min_speedup") and v is not None)
    lines = [f"# Decision report: {recipe.name}", "",
             f"Model **{recipe.model.slug}** · {time.strftime('%Y-%m-%d %H:%M %Z')}"
             + (f" · MLflow run `{run_id}`" if run_id else ""), ""]
    for target, o in outcomes.items():
        lines.append(f"**{outcome_line(target, o)}**" + (f" · load: `{o['alias_uri']}`" if o["alias_uri"] else ""))
        lines.append("")
    n = sorted({v["n"] for r in rows for v in r.get("verdicts", []) if v.get("n") is not None and v.get("bound")
                is not None})
    baselines = [r for r in rows if r["status"] == "baseline"]
    base_vals = "; ".join(f"{r['target']}: " + ", ".join(f"{task} {k} {gates.human(v)}"
                                                        for task, vals in (r.get("accuracy") or {}).items()
                                                        for k, v in vals.items() if k in ("word_perplexity", "acc"))
                          for r in baselines)
    lines += [f"- items per accuracy gate: {', '.join(map(str, n)) or 'none'} (held-out; evaluation.limit "
              f"{recipe.evaluation.limit})",
              f"- baseline (unquantized): {base_vals or 'not measured'}",
              f"- accuracy tolerances: {tolerances}; one-sided {acc.confidence:.0%} paired-bootstrap bound",
              f"- latency SLOs at `{recipe.gated_load}`: {slos or 'none'}",
              f"- ladder `{recipe.ladder.strategy}` (metric `{recipe.ladder.metric}`)",
              "- Δ is candidate − baseline (perplexity: relative, + is worse; cloze: absolute, − is worse); "
              "in brackets the worst case at the bound", ""]
    return lines


def write_report(*, recipe, rows: list[dict], decisions: dict[str, dict], out_dir: Path, run_id: str | None = None,
                 promotions: list[dict] | None = None) -> Path:
    """Write report.md and one pair of PNGs per target into out_dir; returns the Markdown file. The table is narrow
    enough for a ~1000 px pane: reasons and host notes are numbered notes below it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    load = recipe.gated_load
    ppl_gate = recipe.gates.accuracy.tasks.get("holdout_perplexity")
    tolerance = ppl_gate.max_relative_increase if ppl_gate else None
    slos = recipe.gates.latency.model_dump()
    outcomes = target_outcomes(rows, decisions, promotions)
    lines = _header(recipe, rows, decisions, run_id, promotions, outcomes)
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
        lines += ["| format | verdict | perplexity Δ | cloze Δ | p95 ms TTFT/TPOT | tok/s | notes |",
                  "|---|---|---|---|---|---|---|"]
        notes: list[str] = []

        def note(text: str) -> str:
            notes.append(text)
            return f"[{len(notes)}]"

        for r in trows:
            v = {x["gate"]: x for x in r.get("verdicts", [])}
            lat = r.get("latency", {}).get(load, {})

            def num(key):
                return "" if lat.get(key) is None else f"{lat[key]:.1f}"

            marks = []
            if r["status"] not in ("pass", "baseline") and r.get("reason"):
                marks.append(note(f"**{r['format']}** {STATUS_WORDS.get(r['status'], r['status'])}: {r['reason']}"))
            for x in r.get("verdicts", []):
                if not x.get("decides", True):
                    marks.append(note(f"**{r['format']}** {gates.statement(x)}"))
            if _host(lat) and not (lat.get("host_load") or {}).get("reliable", True):
                marks.append(note(f"**{r['format']}** latency: {_host(lat)}"))
            if lat.get("not_measured"):  # no decision could use it (e.g. its accuracy gate had already failed)
                why = note(f"**{r['format']}** latency not measured: {lat['not_measured']}")
                speed = f"not measured {why} | |"
            else:
                speed = f"{num('ttft_ms_p95')}/{num('tpot_ms_p95')} | {num('output_tokens_per_s')} |"
            status = STATUS_WORDS.get(r["status"], r["status"])
            lines.append(f"| {r['format']} | {status} | {gates.delta_text(v.get('holdout_perplexity', {}))} | "
                         f"{gates.delta_text(v.get('holdout_cloze', {}))} | {speed} {' '.join(marks)} |")
        if notes:
            lines += ["", "Notes:", ""] + [f"{i}. {text}" for i, text in enumerate(notes, 1)]
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
