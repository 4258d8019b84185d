"""The representativeness report: length distribution, strata, duplicates, activation ranges, thresholds, the hook."""

import json
import random
import re

import pandas as pd
import pytest
import yaml

from recipes.schema import CalibrationSpec, Recipe, RepresentativenessSpec
from tasks.calibration import activation_ranges, calibrate
from tasks.calibration import representativeness as rep


def vocabulary():
    from pydoc_data.topics import topics

    return sorted({w for t in topics.values() for w in t.split() if w.isalpha() and w.islower() and len(w) > 2})


def long_tail_log(path, n=6000, seed=0):
    """Short prompts throughout; in the second half (the log is in time order), 20% are 300-600 words long.

    The long tail is 10% of the log, and none of it is in the first records a naive first-N slice takes."""
    rng, vocab = random.Random(seed), vocabulary()
    with open(path, "w") as f:
        for i in range(n):
            long = i >= n // 2 and rng.random() < 0.2
            words = rng.randint(300, 600) if long else rng.randint(5, 40)
            f.write(json.dumps({"prompt": " ".join(rng.choice(vocab) for _ in range(words)),
                                "tenant": "docs" if long else "chat", "timestamp": 1_700_000_000 + i}) + "\n")
    return path


def tail_share(rows, field):
    """Share of texts in length buckets from 256 tokens up."""
    return sum(getattr(r, field) or 0.0 for r in rows if int(re.match(r"\d+", r.stratum).group()) >= 256)



# ------------------------------------------------------------------------------------------------------ (1) long tail

def test_stratified_sample_keeps_the_long_tail_a_first_n_slice_misses(tiny_model_dir, tmp_path):
    log = long_tail_log(tmp_path / "requests.jsonl")
    spec = CalibrationSpec(source="request_log", paths=[str(log)], samples=300, max_tokens=256)
    art = calibrate.calibrate(spec, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    report = rep.assess(spec, art, model_dir=None, model_fp=None, activations=False)

    source, sample, first_n = (tail_share(report.strata, f) for f in ("source_share", "sample_share", "first_n_share"))
    assert 0.08 < source < 0.12
    assert abs(sample - source) <= 0.01  # stratified: the tail keeps its share
    assert first_n == 0.0  # the naive slice has none of it
    assert report.stratum_share_gap <= 0.01 and report.first_n_stratum_share_gap > 0.05
    assert report.ks < 0.05 and report.first_n_ks > 0.1  # KS sees a missing tail only as its share
    assert report.quantiles["sample"]["p99"] > 2 * report.quantiles["first_n"]["p99"]
    assert report.over_max_tokens_share["first_n"] == 0.0 < report.over_max_tokens_share["sample"]
    md = report.markdown()
    for text in ("## Token lengths", "first-N slice (naive)", "## Strata", "## Duplicates"):
        assert text in md
    tail_row = next(r for r in report.strata if int(r.stratum.split("-")[0].rstrip("+")) >= 256)
    assert f"| {tail_row.stratum} | {tail_row.source_share:.1%} | {tail_row.sample_share:.1%} |" in md
    assert report.duplicates["records"] == 6000 and report.duplicates["usable"] == 6000


# ------------------------------------------------------------------------------------------------------ (5) thresholds

def _reports(tiny_model_dir, tmp_path):
    """Reports on a long-tail log for the stratified sample and for the naive first-N slice of the same log."""
    log = long_tail_log(tmp_path / "requests.jsonl")
    spec = CalibrationSpec(source="request_log", paths=[str(log)], samples=300, max_tokens=256)
    art = calibrate.calibrate(spec, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    inputs = rep.load_inputs(art.path)
    stratified = rep.assess(spec, art, model_dir=None, model_fp=None, activations=False)
    first_n = rep.length_report(sample_tokens=inputs["first_n_tokens"], sample_strata=inputs["first_n_strata"],
                                reference_tokens=inputs["reference_tokens"],
                                reference_strata=inputs["reference_strata"], source_strata=inputs["source_strata"],
                                max_tokens=256, source="request_log")
    return stratified, first_n


def test_unrepresentative_sample_stops_naming_metric_value_and_threshold(tiny_model_dir, tmp_path):
    stratified, first_n = _reports(tiny_model_dir, tmp_path)
    thresholds = RepresentativenessSpec(max_ks=0.08, max_stratum_share_gap=0.03, action="stop")
    assert rep.apply_thresholds(stratified, thresholds).status == "pass"
    rep.enforce(rep.apply_thresholds(stratified, thresholds))  # the stratified sample goes on
    stop = rep.apply_thresholds(first_n, thresholds)
    assert stop.status == "stop" and {c.metric for c in stop.failed} == {"ks", "stratum_share_gap"}
    with pytest.raises(rep.RepresentativenessError) as err:
        rep.enforce(stop)
    msg = str(err.value)
    assert f"ks = {first_n.ks:.4g} > calibration.representativeness.max_ks 0.08" in msg
    assert f"stratum_share_gap = {first_n.stratum_share_gap:.4g} > calibration.representativeness." \
           f"max_stratum_share_gap 0.03" in msg
    assert "before quantization" in msg

    warn = rep.apply_thresholds(first_n, RepresentativenessSpec(max_ks=0.08, action="warn"))
    assert warn.status == "warn" and rep.enforce(warn) == [warn.failed[0].message]  # warns, does not raise
    loose = rep.apply_thresholds(first_n, RepresentativenessSpec(max_ks=0.99, action="stop"))
    assert loose.status == "pass" and rep.enforce(loose) == []


def _recipe(model_dir, log, tmp_path, representativeness):
    data = {"name": "replog", "model": {"source": "hf_dir", "path": str(model_dir)},
            "calibration": {"source": "request_log", "paths": [str(log)], "samples": 32, "max_tokens": 64,
                            "representativeness": representativeness},
            "quantization": {"formats": ["int4_awq"]}, "targets": [{"name": "local"}],
            "evaluation": {"tasks": ["holdout_perplexity"], "limit": 8}, "registry": {"name": "replog"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return Recipe.model_validate(data), path


def test_flow_hook_stops_the_run_before_quantization(chat_model_dir, tmp_path, monkeypatch):
    from flows import pipeline, prepare
    from flows.stages import RunRecord
    from registry import client as registry_client
    from registry import tracking as registry
    from tasks.backends import target_runtime
    from tasks.decisions.targets import make_plan
    from tasks.host import machine
    from tasks.models import import_model

    rng, vocab = random.Random(1), vocabulary()
    log = tmp_path / "chat.jsonl"
    log.write_text("".join(json.dumps({"messages": [{"role": "user", "content": " ".join(
        rng.choice(vocab) for _ in range(rng.randint(5, 60)))}]}) + "\n" for _ in range(400)))
    # a threshold no sample can meet: the wiring, not the statistics, is under test here
    recipe, recipe_file = _recipe(chat_model_dir, log, tmp_path, {"max_ks": 0.001, "action": "stop"})
    quantized = []
    monkeypatch.setattr(prepare, "import_task", import_model.import_model)
    monkeypatch.setattr(prepare, "calibrate_task", calibrate.calibrate)
    monkeypatch.setattr(prepare, "quantize_task", lambda **kw: quantized.append(kw))
    device = machine.local_device()
    record = RunRecord()
    record.run_id = registry.start_pipeline_run(experiment="replog", run_name="t", recipe_file=recipe_file,
                                                recipe_digest=recipe.digest(), params={}, tags={})
    with pytest.raises(rep.RepresentativenessError, match=r"ks = [0-9.]+ > calibration.representativeness.max_ks "
                                                          r"0.001"):
        pipeline._certify(recipe, tmp_path, device, make_plan(recipe, device, runtime_of=target_runtime), record)
    assert quantized == []  # stopped before quantization
    assert [s["stage"] for s in record.stages] == ["import", "calibrate", "represent"]
    run = registry_client.client().get_run(record.run_id)  # the report was logged before the stop
    assert run.data.tags["calibration.representativeness"] == "stop"
    assert run.data.metrics["representativeness.ks"] > 0.001
    assert run.data.metrics["representativeness.activation_ratio"] >= 1.0  # request logs: activations computed
    logged = {f.path for f in registry_client.client().list_artifacts(record.run_id, "representativeness")}
    assert {"representativeness/report.json", "representativeness/report.md", "representativeness/report.png",
            "representativeness/strata.json", "representativeness/activation_ranges.json"} <= logged


def test_prefect_artifacts_have_valid_keys(tiny_model_dir, tmp_path, monkeypatch):
    import prefect.artifacts
    from prefect.context import FlowRunContext

    from flows import publish

    report = rep.apply_thresholds(_reports(tiny_model_dir, tmp_path)[1], RepresentativenessSpec(max_ks=0.08))
    report = rep.replace(report, layers=(activation_ranges.LayerRange("model.layers.0.mlp.down_proj", 2.0, 1.0, 2.0),),
                         activation_ratio=2.0)
    made = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **kw: made.append(("md", kw)))
    monkeypatch.setattr(prefect.artifacts, "create_table_artifact", lambda **kw: made.append(("table", kw)))
    publish.representativeness("Demo Recipe", report)
    assert made == []  # outside a flow run: nothing to attach to
    monkeypatch.setattr(FlowRunContext, "get", classmethod(lambda cls: object()))
    publish.representativeness("Demo Recipe", report)
    keys = [kw["key"] for _, kw in made]
    assert keys == ["demo-recipe-calibration-representativeness", "demo-recipe-calibration-strata",
                    "demo-recipe-calibration-activation-ranges"]  # per recipe: recipes do not overwrite each other
    assert all(re.fullmatch(r"[a-z0-9-]*", k) for k in keys)
    assert "# Calibration representativeness: WARN" in made[0][1]["markdown"]
    assert made[1][1]["table"][0].keys() >= {"stratum", "source_share", "sample_share", "gap"}


# ------------------------------------------------------------------------------------------------------ activations

def test_activation_ranges_compare_calibration_and_holdout(tiny_model_dir):
    rng, vocab = random.Random(2), vocabulary()
    prose = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(8)]
    same = activation_ranges.activation_ranges(str(tiny_model_dir), prose, prose, max_tokens=32, batch_size=4)
    assert len(same) == 14 and all(r.ratio == 1.0 for r in same)  # 7 Linear layers x 2 decoder layers, no lm_head
    assert not any("lm_head" in r.layer for r in same)
    odd = ["~~~ ||| ^^^ ``` $$$ ### @@@ " * 4 for _ in range(8)]
    rows = activation_ranges.activation_ranges(str(tiny_model_dir), prose, odd, max_tokens=32, batch_size=4)
    assert [r.ratio for r in rows] == sorted((r.ratio for r in rows), reverse=True) and rows[0].ratio > 1.0
    report = rep.Report(source="t", n_sample=8, n_reference=8, ks=0.0, ks_pvalue=1.0, quantiles={}, strata=(),
                        stratum_share_gap=0.0, over_max_tokens_share={}, duplicates={}, layers=rows,
                        activation_ratio=rows[0].ratio)
    checked = rep.apply_thresholds(report, RepresentativenessSpec(max_activation_ratio=1.0001, action="stop"))
    assert checked.failed[0].metric == "activation_ratio"
    assert rows[0].layer in checked.failed[0].message and "max_activation_ratio 1.0001" in checked.failed[0].message


def test_activation_ranges_are_cached_by_content(tiny_model_dir, tmp_path):
    rng, vocab = random.Random(3), vocabulary()
    log = tmp_path / "l.jsonl"
    log.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 40)))})
                           + "\n" for _ in range(300)))
    spec = CalibrationSpec(source="request_log", paths=[str(log)], samples=16, max_tokens=32,
                           representativeness={"activation_samples": 8})
    art = calibrate.calibrate(spec, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    first = rep.assess(spec, art, model_dir=str(tiny_model_dir), model_fp="fp-1")
    again = rep.assess(spec, art, model_dir=str(tiny_model_dir), model_fp="fp-1")
    assert not first.cached and again.cached and first.layers == again.layers and first.activation_ratio >= 1.0
    assert not rep.assess(spec, art, model_dir=str(tiny_model_dir), model_fp="fp-2").cached  # another model


# ------------------------------------------------------------------------------------------------------ other sources

def test_report_for_a_pydoc_source_and_the_plot(tiny_model_dir, tmp_path):
    spec = CalibrationSpec(source="pydoc_topics", samples=32, max_tokens=64,
                           representativeness={"max_ks": 0.5, "max_stratum_share_gap": 0.5})
    art = calibrate.calibrate(spec, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    assert not rep.wants_activations(spec)
    report = rep.assess(spec, art, model_dir=str(tiny_model_dir), model_fp="x")
    assert report.layers == () and report.status == "pass" and report.first_n_ks is None
    unjudged = rep.assess(CalibrationSpec(source="pydoc_topics", samples=32, max_tokens=64), art,
                          model_dir=str(tiny_model_dir), model_fp="x")
    assert unjudged.status == "unchecked" and "UNCHECKED" in unjudged.markdown()  # no threshold: no PASS
    assert "no thresholds set" in unjudged.summary() and rep.enforce(unjudged) == []
    assert report.n_sample == 32 and report.n_reference == len(pd.read_parquet(art.path + "/reference.parquet"))
    json.dumps(report.as_dict())  # serialisable for MLflow
    inputs = rep.load_inputs(art.path)
    fig = rep.figure(report, sample_tokens=inputs["sample_tokens"], reference_tokens=inputs["reference_tokens"])
    fig.savefig(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 10_000
