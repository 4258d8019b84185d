"""`plan` computes every stage's key with the stage's own functions: right after a run, nothing would rerun."""

import pytest
import yaml

from recipes.load import load_recipe


@pytest.fixture
def hf_dir_recipe(tiny_model_dir, tmp_path):
    data = {"name": "planned", "model": {"source": "hf_dir", "path": str(tiny_model_dir)},
            "calibration": {"source": "pydoc_topics", "samples": 16, "max_tokens": 32},
            "quantization": {"formats": ["fp8"]}, "targets": [{"name": "local"}],
            "evaluation": {"tasks": ["holdout_perplexity"], "limit": 8}, "registry": {"name": "planned"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_plan_after_a_run_of_an_hf_dir_recipe_reports_every_stage_cached(hf_dir_recipe, monkeypatch):
    from flows import prepare
    from flows.cache_status import plan_stages
    from flows.stages import RunRecord
    from tasks import backends
    from tasks.backends import target_runtime
    from tasks.calibration import calibrate
    from tasks.decisions.targets import make_plan
    from tasks.host import machine
    from tasks.models import import_model
    from tasks.profiles import build
    from tasks.profiles.profile import BASELINE
    from tasks.quantization import quantize

    # the flow's own front half, with its Prefect tasks as the plain stage functions they wrap
    monkeypatch.setattr(prepare, "import_task", import_model.import_model)
    monkeypatch.setattr(prepare, "calibrate_task", calibrate.calibrate)
    monkeypatch.setattr(prepare, "quantize_task", quantize.quantize)
    recipe, base_dir = load_recipe(hf_dir_recipe)
    device = machine.local_device()
    plan = make_plan(recipe, device, runtime_of=target_runtime)
    before = plan_stages(recipe, base_dir, plan, device)
    assert {r["stage"]: r["action"] for r in before if r["stage"] != "import"} == {"calibrate": "run",
                                                                                   "downstream": "run"}

    record = RunRecord()
    model, calib = prepare.prepare(recipe, base_dir, record)
    quantized, errors = prepare.quantize_formats(recipe, plan, model, calib, record)
    assert errors == {}
    target = recipe.targets[0]
    # the builds flows/target.py makes: the baseline from the model, each format from its checkpoint
    build.build(model_slug=model.name, checkpoint_dir=model.path, checkpoint_fp=model.fingerprint, fmt=BASELINE,
                quant_algo=None, target=target, device=device)
    q = quantized["fp8"]
    build.build(model_slug=model.name, checkpoint_dir=backends.checkpoint_for(q, target), checkpoint_fp=q.fingerprint,
                fmt="fp8", quant_algo=q.quant_algo, target=target, device=device)

    after = plan_stages(recipe, base_dir, plan, device)
    assert [(r["stage"], r["subject"]) for r in after] == [
        ("import", recipe.model.slug), ("calibrate", "pydoc_topics"), ("quantize", "fp8"), ("build", "none@local"),
        ("build", "fp8@local")]
    assert all(r["action"] == "reuse" for r in after), after
