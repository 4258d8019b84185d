"""How runs are tagged and keyed in Prefect (no server)."""

from types import SimpleNamespace

from flows.deploy import load_plan
from flows.prefect_edge import artifact_key, trigger_tags


def test_only_scheduled_runs_get_the_schedule_tag():
    assert trigger_tags(SimpleNamespace(type="SCHEDULE", display_value="nightly")) == ["scheduled", "nightly"]
    assert trigger_tags(SimpleNamespace(type="USER", display_value="me")) == []
    assert trigger_tags(None) == []  # a manual run from the UI or a webhook run
    for deployment in load_plan().deployments:  # deployment tags go on every run: no schedule-specific ones there
        assert "nightly" not in deployment.tags, deployment.tags


def test_artifact_keys_are_per_recipe_and_valid_prefect_keys():
    assert artifact_key("smollm2-135m-demo", "decision-report") == "smollm2-135m-demo-decision-report"
    assert artifact_key("My_Recipe v2", "plan") == "my-recipe-v2-plan"


def test_printed_ui_commands_and_links_agree_on_a_configured_port(monkeypatch):
    """The commands the run prints serve where its links point, on a port other than the default: MLflow's
    `--port`, Prefect's API port and the API URL its UI calls (without them a UI on another port calls 4200)."""
    import shlex

    from flows.env import prefect_ui_command
    from flows.prefect_edge import flow_run_url
    from registry import client

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("ENGINEWRIGHT_MLFLOW_UI_URL", "http://127.0.0.1:5123")
    monkeypatch.setenv("ENGINEWRIGHT_PREFECT_UI_URL", "http://127.0.0.1:4321/")
    mlflow_cmd = shlex.split(client.ui_command().split("#")[0])
    assert mlflow_cmd[mlflow_cmd.index("--port") + 1] == "5123" and client.ui_url() == "http://127.0.0.1:5123"
    assert mlflow_cmd[0].endswith("/mlflow") and mlflow_cmd[0].startswith("/")  # works from any directory
    prefect_cmd = prefect_ui_command()
    assert "PREFECT_SERVER_API_PORT=4321" in prefect_cmd
    assert "PREFECT_UI_API_URL=http://127.0.0.1:4321/api" in prefect_cmd
    assert "--port 4321" in prefect_cmd
    assert flow_run_url("abc") == "http://127.0.0.1:4321/runs/flow-run/abc"
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.internal:4200/api")
    assert flow_run_url("abc") == "http://prefect.internal:4200/runs/flow-run/abc"
    assert flow_run_url(None) is None


def test_experiments_open_on_runs_not_on_genai_traces():
    from registry import client

    exp_id = client.experiment_id("kind-test")
    assert client.client().get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    c = client.client()
    old = c.create_experiment("made-before")  # an experiment created before the kind was set gets it on next use
    assert client.experiment_id("made-before") == old
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
