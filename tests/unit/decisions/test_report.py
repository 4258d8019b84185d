from recipes.schema import Recipe
from tasks.decisions.report import write_report


def test_report_shows_every_rung_the_decision_and_plots(tmp_path):
    recipe = Recipe.model_validate({
        "name": "r", "model": {"source": "hub", "id": "x/y"}, "calibration": {"source": "pydoc_topics"},
        "quantization": {"formats": ["int8_sq", "fp8"]}, "targets": [{"name": "local"}],
        "evaluation": {"tasks": ["holdout_perplexity"]}, "latency": {"concurrency": [1, 4]},
        "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 0.08}}},
                  "latency": {"ttft_p95_ms": 900}},
        "registry": {"name": "m"}})
    lat = lambda tps, ttft: {"concurrency=4": {"output_tokens_per_s": tps, "ttft_ms_p50": ttft / 2, "ttft_ms_p90": ttft,
                                               "ttft_ms_p95": ttft, "ttft_ms_p99": ttft, "tpot_ms_p50": 10,
                                               "tpot_ms_p95": 12}}
    ppl = lambda value, bound, verdict: [{"gate": "holdout_perplexity", "value": value, "bound": bound,
                                          "verdict": verdict}]
    rows = [
        {"format": "none", "target": "local", "arch": "cpu-x86_64", "status": "baseline", "latency": lat(20, 300)},
        {"format": "int8_sq", "target": "local", "arch": "cpu-x86_64", "status": "fail", "reason": "ppl too high",
         "latency": lat(8, 600), "verdicts": ppl(0.15, 0.19, "fail")},
        {"format": "fp8", "target": "local", "arch": "cpu-x86_64", "status": "pass", "reason": "all gates passed",
         "latency": lat(5, 800), "verdicts": ppl(0.026, 0.036, "pass")},
    ]
    rows[2]["latency"]["concurrency=4"]["host_load"] = {"reliable": False, "note": "unreliable: others busy",
                                                        "load_1m_mean": 3.1, "foreign_cpu_cores_mean": 1.4}
    rows.append({"format": "int8_sq+qat", "target": "local", "arch": "cpu-x86_64", "status": "pass",
                 "reason": "all gates passed", "latency": lat(6, 700), "verdicts": ppl(0.05, 0.07, "pass"),
                 "recovery": {"recovery_method": "qat", "recovered_from": "int8_sq", "seconds": 312.4,
                              "config": {"steps": 60, "lr": 5e-5, "batch_size": 4, "seq_len": 128, "texts": 512},
                              "loss_curve": [0.31, 0.2, 0.12]}})
    note = "reference runtime (fake quantization): not a deployment number; measured and reported"
    path = write_report(recipe=recipe, rows=rows, out_dir=tmp_path,
                        decisions={"local": {"format": "fp8", "reason": "fp8 passed", "latency_note": note}})
    text = path.read_text()
    assert "**Decision:** fp8 — fp8 passed" in text
    assert "| int8_sq | rejected | +15.0% (≤ +19.0%) |" in text
    # long reasons are numbered notes below the table, not a column that pushes the table off a pane
    assert "1. **int8_sq** rejected: ppl too high" in text
    assert all("ppl too high" not in line for line in text.splitlines() if line.startswith("| int8_sq |"))
    assert "concurrency=4" in text
    assert f"**Latency did not decide:** {note}" in text
    assert "| int8_sq+qat | passed | +5.0% (≤ +7.0%)" in text
    assert ("**int8_sq+qat** (recovery rung after int8_sq failed its accuracy gate): distilled from the unquantized "
            "model for 60 steps (lr 5e-05, 4x128 tokens, 512 non-held-out texts); KL 0.3100 → 0.1200; 312 s") in text
    assert "**fp8** latency: **unreliable: others busy** (load 3.1, others 1.4 cores)" in text
    assert (tmp_path / "local-pareto.png").stat().st_size > 1000
    assert (tmp_path / "local-latency.png").stat().st_size > 1000
    # viewers that cannot fetch files next to the report get the plots embedded
    import base64

    from tasks.decisions.report import inline_images

    embedded = inline_images(text, tmp_path)
    png = (tmp_path / "local-pareto.png").read_bytes()
    assert "](local-pareto.png)" not in embedded and base64.b64encode(png).decode() in embedded
    page = (tmp_path / "report.html").read_text()
    assert '<img src="data:image/png;base64,' in page and "<table>" in page and "<td>int8_sq</td>" in page


def test_report_says_which_latency_was_not_measured_and_why_and_the_reduced_load(tmp_path):
    recipe = Recipe.model_validate({
        "name": "r", "model": {"source": "hub", "id": "x/y"}, "calibration": {"source": "pydoc_topics"},
        "quantization": {"formats": ["int8_sq"]}, "targets": [{"name": "local"}],
        "evaluation": {"tasks": ["holdout_perplexity"]},
        "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 0.08}}},
                  "latency": {"ttft_p95_ms": 900}},
        "registry": {"name": "m"}})
    rows = [{"format": "none", "target": "local", "arch": "cpu-x86_64", "status": "baseline",
             "latency": {"concurrency=1": {"output_tokens_per_s": 20, "ttft_ms_p50": 100, "ttft_ms_p95": 120}},
             "latency_load": "reduced load on a runtime whose speed does not decide: concurrency=1 only"},
            {"format": "int8_sq", "target": "local", "arch": "cpu-x86_64", "status": "fail", "reason": "ppl high",
             "latency": {"concurrency=1": {"not_measured": "accuracy failed"}, "not_measured": "accuracy failed"},
             "latency_not_measured": "accuracy failed",
             "verdicts": [{"gate": "holdout_perplexity", "value": 0.2, "bound": 0.25, "verdict": "fail"}]}]
    text = write_report(recipe=recipe, rows=rows, out_dir=tmp_path, decisions={"local": {"reason": "none"}}).read_text()
    [row] = [line for line in text.splitlines() if line.startswith("| int8_sq |")]
    assert "not measured" in row and "latency not measured: accuracy failed" in text and "ppl high" in text
    assert "**Latency load:** reduced load on a runtime whose speed does not decide: concurrency=1 only." in text


def test_report_header_names_the_promoted_version_and_how_to_load_it(tmp_path):
    recipe = Recipe.model_validate({
        "name": "r", "model": {"source": "hub", "id": "x/y"}, "calibration": {"source": "pydoc_topics"},
        "quantization": {"formats": ["fp8"]}, "targets": [{"name": "local"}],
        "evaluation": {"tasks": ["holdout_perplexity"], "limit": 50},
        "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 0.08}}}},
        "registry": {"name": "m"}})
    rows = [{"format": "none", "target": "local", "arch": "cpu-x86_64", "status": "baseline",
             "accuracy": {"holdout_perplexity": {"word_perplexity": 23.456789123}}},
            {"format": "fp8", "target": "local", "arch": "cpu-x86_64", "status": "pass", "reason": "",
             "verdicts": [{"gate": "holdout_perplexity", "value": 0.01, "bound": 0.02, "verdict": "pass", "n": 50,
                           "threshold": 0.08}]}]
    promotions = [{"registered_model": "m-reference", "target": "local", "version": "3",
                   "alias": "champion-cpu-x86-64", "action": "moved"}]
    text = write_report(recipe=recipe, rows=rows, decisions={"local": {"format": "fp8", "reason": "fp8 passed"}},
                        out_dir=tmp_path, run_id="abc123", promotions=promotions).read_text()
    head = text.split("## Target")[0]
    assert "Model **y**" in head and "MLflow run `abc123`" in head
    assert "**local: fp8 → m-reference v3, alias champion-cpu-x86-64 (moved)**" in head
    assert "`models:/m-reference@champion-cpu-x86-64`" in head
    assert "items per accuracy gate: 50" in head and "holdout_perplexity word_perplexity 23.46" in head
    assert "holdout_perplexity relative increase ≤ 0.08" in head
