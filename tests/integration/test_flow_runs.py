"""The real certify flow on a tiny model with small limits, MLflow logging on: every calibration source; the run's
outcome as a flow state and an exit code; and what a run shows in Prefect and MLflow, each pointing at the other."""

import json

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """One store for the module: the import and baseline build are computed once."""
    return tmp_path_factory.mktemp("sources-home")


def _paragraphs(n: int = 80) -> list[str]:
    import re
    from pydoc_data.topics import topics

    texts = [" ".join(p.split()) for t in topics.values() for p in re.split(r"\n\s*\n", t)]
    return [t for t in texts if len(t) >= 200][:n]


def _recipe(tmp_path, model_dir, calibration: dict, **extra) -> str:
    recipe = {
        "name": f"src-{calibration['source']}", "model": {"source": "hf_dir", "path": str(model_dir), "name": "tiny"},
        "calibration": {"samples": 8, "max_tokens": 32, **calibration},
        "quantization": {"formats": ["fp8"]}, "targets": [{"name": "local"}],
        "evaluation": {"tasks": ["holdout_perplexity"], "limit": 4, "batch_size": 4, "max_length": 64},
        "latency": {"requests": 1, "warmup": 0, "input_tokens": 4, "output_tokens": 2},
        "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 5.0}}, "bootstrap": 100}},
        "registry": {"name": "tiny"}} | extra
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _write_source(kind: str, tmp_path) -> dict:
    texts = _paragraphs()
    if kind == "txt":
        (tmp_path / "corpus.txt").write_text("\n\n".join(texts))
        return {"source": "files", "paths": [str(tmp_path / "corpus.txt")]}
    if kind == "jsonl":
        (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
        return {"source": "files", "paths": [str(tmp_path / "corpus.jsonl")], "text_field": "body"}
    if kind == "parquet":
        pd.DataFrame({"text": texts}).to_parquet(tmp_path / "corpus.parquet")
        return {"source": "files", "paths": [str(tmp_path / "corpus.parquet")]}
    if kind == "request_log":
        (tmp_path / "requests.jsonl").write_text("".join(
            json.dumps({"prompt": t, "tenant": f"t{i % 3}"}) + "\n" for i, t in enumerate(texts)))
        return {"source": "request_log", "paths": [str(tmp_path / "requests.jsonl")], "samples": 8}
    return {"source": "hub", "dataset": "acme/prose", "split": "train", "revision": "0123abc"}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet", "request_log", "hub"])
def test_every_calibration_source_runs_through_the_flow_with_mlflow(kind, prefect_harness, shared_home,
                                                                    tiny_model_dir, tmp_path, monkeypatch):
    import datasets

    from flows.pipeline import certify
    from registry import client as registry_client

    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(shared_home))
    calls = []
    if kind == "hub":  # no hub here: the datasets call answers with a local dataset, the rest is the real path
        real_load = datasets.load_dataset

        def fake_hub(path, *args, **kwargs):
            if path != "acme/prose":
                return real_load(path, *args, **kwargs)
            calls.append((path, kwargs.get("revision")))
            return datasets.Dataset.from_dict({"text": _paragraphs()})

        monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    state = certify(_recipe(tmp_path, tiny_model_dir, _write_source(kind, tmp_path)), return_state=True)
    result = state.result(raise_on_failure=False)
    assert not isinstance(result, BaseException), result
    assert result["errors"] == [] and result["outcome"] == "certified", result
    assert state.is_completed()
    assert {r["status"] for r in result["rows"]} == {"baseline", "pass"}

    run = registry_client.client().get_run(result["run_id"])
    [dataset_input] = run.inputs.dataset_inputs
    source = json.loads(dataset_input.dataset.source)
    origin = json.loads(run.data.tags["calibration.origin"])
    assert origin["source"] == ("files" if kind in ("txt", "jsonl", "parquet") else kind)
    if kind == "hub":
        assert calls == [("acme/prose", "0123abc")]
        assert dataset_input.dataset.source_type == "hugging_face"
        assert source["path"] == "acme/prose" and source["revision"] == "0123abc"
    else:
        assert dataset_input.dataset.source_type == "local" and source["uri"].endswith("calibration.parquet")
        assert origin["paths"][0].endswith(("corpus.txt", "corpus.jsonl", "corpus.parquet", "requests.jsonl"))
    assert run.data.metrics["calibration.count"] == 8


def test_a_run_that_certifies_nothing_fails_with_its_own_state_and_exit_code(prefect_harness, shared_home,
                                                                               tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import EXIT_NOT_CERTIFIED, app
    from flows.pipeline import certify

    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(shared_home))
    recipe = _recipe(tmp_path, tiny_model_dir, _write_source("txt", tmp_path))
    impossible = ["gates.accuracy.tasks.holdout_perplexity.max_relative_increase=1e-9"]  # fp8 changes something

    state = certify(recipe, impossible, return_state=True)
    assert state.is_failed() and state.name == "NotCertified"
    assert "nothing certified for target local" in state.message and "holdout_perplexity" in state.message
    result = state.result(raise_on_failure=False)
    assert result["outcome"] == "not_certified" and result["promotions"] == [] and result["errors"] == []

    out = CliRunner().invoke(app, ["run", recipe, "--set", impossible[0], "--json"])
    assert out.exit_code == EXIT_NOT_CERTIFIED == 4, out.output
    assert json.loads(out.stdout)["outcome"] == "not_certified"  # stdout is the run record only: `| jq` works
    assert "nothing promoted" in out.stderr


def test_too_few_held_out_items_stop_the_run_as_bad_input_before_quantizing(prefect_harness, shared_home,
                                                                             tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import EXIT_BAD_INPUT, app

    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(shared_home))
    recipe = _recipe(tmp_path, tiny_model_dir, _write_source("txt", tmp_path))
    out = CliRunner().invoke(app, ["run", recipe, "--set", "evaluation.limit=100"])
    assert out.exit_code == EXIT_BAD_INPUT == 2, out.output
    assert "evaluation.limit=100, but the held-out split" in out.stderr
    assert "quantize" not in out.output  # stopped before any quantization


def _api(method: str, path: str, body: dict | None = None):
    """The Prefect REST API as the UI reads it."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            answer = await client._client.request(method, path, json=body)
            answer.raise_for_status()
            return answer.json()
    return asyncio.run(go())


def _artifacts(flow_run_id) -> list[dict]:
    return _api("POST", "/artifacts/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}, "limit": 200,
                                               "sort": "CREATED_DESC"})


def test_prefect_and_mlflow_point_at_each_other(prefect_harness, shared_home, tiny_model_dir, tmp_path, monkeypatch):
    from flows.pipeline import certify
    from registry import client as registry_client

    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(shared_home))
    recipe = _recipe(tmp_path, tiny_model_dir, {"source": "pydoc_topics"}, name="Links Demo")
    first = certify(recipe, model_version="7", return_state=True)
    second = certify(recipe, model_version="7", return_state=True)  # every heavy stage a cache hit
    result = second.result()
    runs = {s: _api("GET", f"/flow_runs/{s.state_details.flow_run_id}") for s in (first, second)}
    assert runs[second]["name"] == "recipe 7"  # recipe file stem + model version
    second_id = runs[second]["id"]

    tasks = {t["name"]: t["state"]["name"] for t in _api("POST", "/task_runs/filter", {
        "flow_runs": {"id": {"any_": [second_id]}}, "limit": 200, "sort": "EXPECTED_START_TIME_ASC"})}
    for name in ("build fp8@local", "accuracy fp8@local", "latency fp8@local", "gate fp8@local",
                 "accuracy none@local", "calibrate pydoc_topics", "quantize fp8", "target local"):
        assert name in tasks, sorted(tasks)
    assert tasks["accuracy fp8@local"] == tasks["quantize fp8"] == "Cached" and tasks["gate fp8@local"] == "Passed"

    artifacts = {a["key"]: a for a in _artifacts(second_id)}
    assert {"links-demo-mlflow-run", "links-demo-decision-report", "links-demo-calibration-representativeness"} \
        <= set(artifacts)
    assert result["run_id"] in artifacts["links-demo-mlflow-run"]["data"]

    c = registry_client.client()
    run = c.get_run(result["run_id"])
    assert run.data.tags["prefect.flow_run_id"] == second_id
    assert run.data.tags["prefect.flow_run_name"] == "recipe 7"
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"].endswith("pipeline.py")
    assert run.data.tags["mlflow.source.git.commit"] == registry_client.code_version()

    children = {r.info.run_name: r for r in c.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    candidate = children["fp8@local"]
    assert candidate.data.tags["prefect.flow_run_id"] == second_id
    metrics = candidate.data.metrics
    assert metrics["gates.pass"] == 1.0 and metrics["gate.holdout_perplexity.pass"] == 1.0
    assert "gate.holdout_perplexity.bound" in metrics and "delta.holdout_perplexity.word_perplexity" in metrics
    assert any(k.startswith("latency.concurrency_1.ttft_ms_p95") for k in metrics)
    history = c.get_metric_history(candidate.info.run_id, "gates.pass")
    assert history[0].timestamp >= run.info.start_time > 0  # a real time, not 1970
    assert [a.path for a in c.list_artifacts(candidate.info.run_id, "lm_eval")] == ["lm_eval/lm_eval_results.json"]
    lm_eval = json.loads(open(c.download_artifacts(candidate.info.run_id, "lm_eval/lm_eval_results.json",
                                                    str(tmp_path))).read())
    assert "holdout_perplexity" in lm_eval["results"] and "configs" in lm_eval and "config" in lm_eval

    # nested runs span their work: created before it, ended after it
    first_run = c.get_run(first.result()["run_id"])
    first_children = {r.info.run_name: r for r in c.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{first_run.info.run_id}'")}
    stages = {(s["stage"], s["subject"]): s for s in first.result()["stages"]}
    work = stages[("accuracy", "fp8@local")]
    fp8 = first_children["fp8@local"].info
    assert fp8.start_time / 1000 <= work["started_at"] and fp8.end_time / 1000 >= work["started_at"] + work["seconds"]


def test_a_dry_run_publishes_its_plan_as_a_table(prefect_harness, shared_home, tiny_model_dir, tmp_path, monkeypatch):
    from flows.pipeline import certify

    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(shared_home))
    state = certify(_recipe(tmp_path, tiny_model_dir, {"source": "pydoc_topics"}, name="Plan Demo"), dry_run=True,
                    return_state=True)
    run_id = state.state_details.flow_run_id
    [table] = _artifacts(run_id)
    assert table["key"] == "plan-demo-plan" and table["type"] == "table" and "fp8" in str(table["data"])
    assert _api("GET", f"/flow_runs/{run_id}")["name"] == "recipe unversioned dry-run"
