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
    assert {r["stage"] for r in before if r["action"] == "run"} == STAGES - {"import"}  # every stage listed

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
        ("build", "fp8@local"), ("accuracy", "none@local"), ("accuracy", "fp8@local"), ("latency", "none@local"),
        ("latency", "fp8@local"), ("gate", "fp8@local"), ("promote", "local")]
    assert all(r["action"] == "reuse" for r in after if r["stage"] not in ("accuracy", "latency", "gate",
                                                                          "promote")), after
    # the validation keys come from the build manifests' fingerprints: measured once, reused by plan
    from tasks.validation import accuracy

    profile = build.build(model_slug=model.name, checkpoint_dir=backends.checkpoint_for(q, target),
                          checkpoint_fp=q.fingerprint, fmt="fp8", quant_algo=q.quant_algo, target=target,
                          device=device)
    accuracy.measure_accuracy(profile_dir=profile.path, profile_fp=profile.fingerprint, backend_name=target.backend,
                              spec=recipe.evaluation, holdout_file=calib.holdout_file)
    actions = {(r["stage"], r["subject"]): r["action"] for r in plan_stages(recipe, base_dir, plan, device)}
    assert actions[("accuracy", "fp8@local")] == "reuse" and actions[("accuracy", "none@local")] == "run"

    # one field changed: plan names it with its old and new value, and lists every stage downstream of it
    changed, _ = load_recipe(hf_dir_recipe, ["calibration.samples=24"])
    rows = plan_stages(changed, base_dir, make_plan(changed, device, runtime_of=target_runtime), device)
    calib_row = next(r for r in rows if r["stage"] == "calibrate")
    assert calib_row["action"] == "run" and calib_row["reason"] == "samples: 16 → 24", calib_row
    assert {r["stage"] for r in rows} == STAGES
    assert all(r["action"] == "run" for r in rows if r["stage"] != "import")
    assert next(r for r in rows if r["stage"] == "quantize")["estimate_s"] > 0  # from the recorded fp8 quantize


STAGES = {"import", "calibrate", "quantize", "build", "accuracy", "latency", "gate", "promote"}
