"""flows/target.py's order of a profile's two validation stages: accuracy, then latency only where a decision can
use it, under the load the gates choose."""

from types import SimpleNamespace

from flows import target
from flows.stages import RunRecord
from recipes.load import load_recipe
from tasks.validation.latency import LatencyResult


def _stages(monkeypatch):
    calls = []

    def accuracy(**kw):
        calls.append(("accuracy", kw))
        return SimpleNamespace(items_file="items.parquet", metrics={}, cached=False)

    def latency(**kw):
        calls.append(("latency", kw))
        return LatencyResult("lat", {"concurrency=1": {"ttft_ms_p95": 1.0}}, 0.1)

    monkeypatch.setattr(target, "accuracy_task", accuracy)
    monkeypatch.setattr(target, "latency_task", latency)
    return calls


PROFILE = SimpleNamespace(format="fp8", target="local", path="p", fingerprint="f", backend="reference")
HOLDOUT = SimpleNamespace(holdout_file="h.parquet", holdout_digest="d")


def test_latency_is_not_measured_when_accuracy_already_failed(monkeypatch):
    calls = _stages(monkeypatch)
    recipe, _ = load_recipe("recipes/demo.yaml")
    record = RunRecord()
    acc, lat = target._validate(record, recipe, HOLDOUT, PROFILE, {}, "reference runtime",
                                skip_latency=lambda acc: "accuracy failed")
    assert [c for c, _ in calls] == ["accuracy"]
    assert lat.summary["not_measured"] == "accuracy failed"
    assert lat.summary[recipe.gated_load] == {"not_measured": "accuracy failed"}
    assert [s["stage"] for s in record.stages] == ["accuracy"]
    fields = target._measured_fields(recipe, "reference runtime", lat)
    assert fields == {"latency_not_measured": "accuracy failed"}
    assert target._measured_tags(recipe, "reference runtime", lat)["latency_measured"] == "false"


def test_latency_runs_after_accuracy_with_the_reduced_load_on_the_reference_runtime(monkeypatch):
    calls = _stages(monkeypatch)
    recipe, _ = load_recipe("recipes/demo.yaml")
    _, lat = target._validate(RunRecord(), recipe, HOLDOUT, PROFILE, {}, "reference runtime",
                              skip_latency=lambda acc: None)
    assert [c for c, _ in calls] == ["accuracy", "latency"]
    spec = calls[1][1]["spec"]
    assert spec.concurrency == [1] and spec.requests == 3 and spec.warmup == 1
    assert "concurrency=1 only" in target._measured_fields(recipe, "reference runtime", lat)["latency_load"]
    calls.clear()
    target._validate(RunRecord(), recipe, HOLDOUT, PROFILE, {}, None)  # latency decides: the recipe's load
    assert calls[1][1]["spec"] == recipe.latency
