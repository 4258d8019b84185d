"""Every place that states a gate verdict or an accuracy delta gives one answer: the CLI table, the decision report,
the candidate run's MLflow metrics, the registry version's tags and its description.

The candidate below lost 0.020 cloze accuracy (0.500 -> 0.480): every place must say -0.020 (candidate - baseline),
never +0.020; and its latency gate, measured on a runtime whose speed does not decide, must read as not deciding
everywhere, never as a failure (no `gate.ttft_p95_ms.pass = 0`)."""

import re
from types import SimpleNamespace

from rich.console import Console

from flows import cli, target
from recipes.schema import Recipe
from registry import promote
from tasks.decisions import gates
from tasks.decisions.report import write_report

BASE_ACC, CAND_ACC = 0.500, 0.480
EXPECTED_CLOZE = f"{CAND_ACC - BASE_ACC:+.3f}"  # "-0.020", computed here, not by the code under test
WRONG_CLOZE = f"{BASE_ACC - CAND_ACC:+.3f}"  # "+0.020"
NOTE = "reference runtime (fake quantization): not a deployment number"
TTFT = 15245.54995174998


def _verdicts() -> list:
    return [
        gates.GateVerdict("holdout_perplexity", 20.0, 20.6, 0.03, 0.05, 0.08, 100, "pass", "ok", kind="perplexity"),
        gates.GateVerdict("holdout_cloze", BASE_ACC, CAND_ACC, BASE_ACC - CAND_ACC, 0.05, 0.10, 100, "pass", "ok",
                          kind="score"),
        gates.GateVerdict("ttft_p95_ms", 14000.0, TTFT, TTFT, None, 2000.0, 6, "fail",
                          f"ttft_ms_p95 {TTFT:.1f} ms vs SLO 2000.0 ms (not deciding: {NOTE})", decides=False,
                          kind="latency", not_deciding=NOTE),
    ]


def _recipe() -> Recipe:
    return Recipe.model_validate({
        "name": "r", "model": {"source": "hub", "id": "x/y", "revision": "main"},
        "calibration": {"source": "pydoc_topics"}, "quantization": {"formats": ["fp8"]},
        "targets": [{"name": "local"}], "evaluation": {"tasks": ["holdout_perplexity", "holdout_cloze"]},
        "latency": {"concurrency": [1]},
        "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 0.08},
                                         "holdout_cloze": {"max_drop": 0.10}}},
                  "latency": {"ttft_p95_ms": 2000, "at_concurrency": 1}},
        "registry": {"name": "m"}})


def _rows(verdicts) -> list[dict]:
    lat = {"concurrency=1": {"ttft_ms_p50": 9000.0, "ttft_ms_p95": TTFT, "output_tokens_per_s": 3.2}}
    return [
        {"format": "none", "target": "local", "arch": "cpu-x86_64", "backend": "reference", "status": "baseline",
         "reason": "", "latency": lat, "latency_note": NOTE,
         "accuracy": {"holdout_perplexity": {"word_perplexity": 20.0}, "holdout_cloze": {"acc": BASE_ACC}}},
        {"format": "fp8", "target": "local", "arch": "cpu-x86_64", "backend": "reference", "status": "pass",
         "reason": "all gates passed", "latency": lat, "latency_note": NOTE,
         "accuracy": {"holdout_perplexity": {"word_perplexity": 20.6}, "holdout_cloze": {"acc": CAND_ACC}},
         "verdicts": [v.as_dict() for v in verdicts], "registry": "m-reference v1",
         "alias": "champion-cpu-x86-64 (moved)"}]


def test_every_place_states_one_verdict_and_one_delta(tmp_path, monkeypatch):
    verdicts = _verdicts()
    decision = gates.decide(verdicts)
    assert decision.status == "pass"  # the non-deciding latency "fail" does not fail the candidate
    recipe, rows = _recipe(), _rows(verdicts)

    # 1. the CLI table
    console = Console(record=True, width=300)
    cli.print_summary({"stages": [], "rows": rows, "promotions": [], "errors": [], "gated_load": "concurrency=1",
                       "decisions": {"local": {"format": "fp8", "reason": "fp8 passed", "latency_note": NOTE}}},
                      out=console)
    shown = console.export_text()
    fp8_line = next(line for line in shown.splitlines() if "│ fp8" in line)
    assert f"0.480 (Δ {EXPECTED_CLOZE}" in fp8_line and WRONG_CLOZE not in shown
    assert f"ttft_p95_ms not deciding: {NOTE}" in shown

    # 2. the decision report
    report = write_report(recipe=recipe, rows=rows, out_dir=tmp_path,
                          decisions={"local": {"format": "fp8", "reason": "fp8 passed", "latency_note": NOTE}},
                          run_id="r1", promotions=[]).read_text()
    fp8_row = next(line for line in report.splitlines() if line.startswith("| fp8 |"))
    assert f"| {EXPECTED_CLOZE} (≥ -0.050) |" in fp8_row and WRONG_CLOZE not in report
    assert f"ttft_p95_ms not deciding: {NOTE}" in report and "ttft_p95_ms fail" not in report

    # 3. the candidate run's MLflow metrics
    logged = {}
    monkeypatch.setattr(target.tracking, "log_metrics", lambda run_id, metrics: logged.update(metrics))
    monkeypatch.setattr(target.tracking, "log_file", lambda *a, **k: None)
    acc = lambda value: SimpleNamespace(metrics={"holdout_cloze": {"acc": value}}, path=str(tmp_path))  # noqa: E731
    target._log_measurements("run", acc(CAND_ACC), SimpleNamespace(summary={}), baseline=acc(BASE_ACC),
                             decision=decision)
    assert f"{logged['delta.holdout_cloze.acc']:+.3f}" == EXPECTED_CLOZE
    assert logged["gate.holdout_cloze.pass"] is True and logged["gates.pass"] is True
    assert "gate.ttft_p95_ms.pass" not in logged  # 0 would read as a failure in the runs table

    # 4. the registry version's tags and 5. its description
    profile = SimpleNamespace(manifest={"target": {"gpu_name": None}, "toolchain": {"torch": "2"},
                                        "quant_algo": "FP8"}, format="fp8", fingerprint="f" * 8, path="/x")
    tgt = SimpleNamespace(name="local", tp=1, backend="reference")
    tags = promote.version_tags(recipe=recipe, target=tgt, arch="cpu-x86_64", profile=profile, decision=decision,
                                run_id="run", latency={"ttft_ms_p95": TTFT}, lineage={}, latency_note=NOTE)
    assert tags["gate.holdout_cloze"] == "pass" and tags["gate.ttft_p95_ms"] == f"not deciding: {NOTE}"
    assert f"Δ {EXPECTED_CLOZE}" in tags["gate.holdout_cloze.statement"]
    text = promote.describe(recipe, tgt, "cpu-x86_64", profile, decision)
    assert f"holdout_cloze pass: Δ {EXPECTED_CLOZE}" in text and WRONG_CLOZE not in text
    assert "ttft_p95_ms fail" not in text and f"ttft_p95_ms not deciding: {NOTE}" in text
    for place in (text, report, *tags.values()):  # numbers as a person reads them: never 17 digits
        assert not re.search(r"\d\.\d{6,}", str(place)), place
