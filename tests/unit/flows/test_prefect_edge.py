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
