import json
from pathlib import Path

import pytest
import yaml

from recipes.load import load_recipe
from recipes.schema import Recipe, RecipeError

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "recipes" / "demo.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe, _ = load_recipe(path)
    assert recipe.quantization.formats


def _write(tmp_path, mutate) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    stub = tmp_path / "stub.gguf"  # a GGUF header will do for schema tests that don't load the model
    stub.write_bytes(b"GGUF" + bytes(60))
    data["model"]["path"] = str(stub)
    mutate(data)
    out = tmp_path / "r.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def test_typo_field_is_named(tmp_path):
    path = _write(tmp_path, lambda d: d["calibration"].update(samplez=3))
    with pytest.raises(RecipeError, match=r"calibration\.samplez: unknown field"):
        load_recipe(path)


def test_unknown_format_lists_allowed_values(tmp_path):
    path = _write(tmp_path, lambda d: d["quantization"].update(formats=["fp8", "int3"]))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "quantization.formats.1: got 'int3'" in str(err.value)
    assert "'nvfp4'" in str(err.value) and "'int4_awq'" in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    def mutate(d):
        d["calibration"]["samples"] = 0
        d["targets"][0]["backend"] = "tensorrt"
        d["extra_key"] = 1
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, mutate))
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "calibration.samples" in text and "targets.0.backend" in text and "extra_key" in text


def test_missing_model_and_data_files_are_named(tmp_path):
    def mutate(d):
        d["model"]["path"] = str(tmp_path / "nope.gguf")
        d["calibration"] = {"source": "files", "paths": ["missing.jsonl"]}
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, mutate))
    assert "model.path: GGUF file not found" in str(err.value)
    assert "calibration.paths.0: file not found" in str(err.value)


def test_gate_on_task_not_evaluated_is_refused(tmp_path):
    path = _write(tmp_path, lambda d: d["gates"]["accuracy"]["tasks"].update(hellaswag={"max_drop": 0.01}))
    with pytest.raises(RecipeError, match="hellaswag"):
        load_recipe(path)


def test_overrides_apply_before_validation(tmp_path):
    recipe, _ = load_recipe(DEMO, ["quantization.formats=[fp8]", "gates.latency.ttft_p95_ms=123",
                                   "targets.0.name=cpu-box"])
    assert recipe.quantization.formats == ["fp8"]
    assert recipe.gates.latency.ttft_p95_ms == 123
    assert recipe.targets[0].name == "cpu-box"
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe(DEMO, ["quantization.formats"])


def test_pkg_path_resolves_to_the_demo_model_file():
    recipe, base = load_recipe(DEMO)
    from recipes.schema import resolve_path
    assert resolve_path(recipe.model.path, base).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_recipe_digest_changes_with_any_field():
    a, _ = load_recipe(DEMO)
    b, _ = load_recipe(DEMO, ["gates.accuracy.confidence=0.9"])
    assert a.digest() != b.digest()
    assert a.section_digest("quantization") == b.section_digest("quantization")


def test_schema_file_matches_the_model():
    shipped = json.loads((ROOT / "recipes" / "recipe.schema.json").read_text())
    assert shipped == json.loads(json.dumps(Recipe.model_json_schema())), \
        "recipes/recipe.schema.json is stale: regenerate with `enginewright schema > recipes/recipe.schema.json`"


def test_broken_model_and_data_files_are_named_before_any_work(tmp_path, tiny_model_dir):
    import shutil

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"<html>not a model</html>")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, lambda d: d.update(
            model={"source": "gguf", "path": str(garbage)},
            calibration={"source": "files", "paths": [str(tmp_path / "empty.jsonl")]})))
    assert "model.path: not a GGUF file (it starts with b'<htm'" in str(err.value) and str(garbage) in str(err.value)
    assert f"calibration.paths.0: empty file: {tmp_path / 'empty.jsonl'}" in str(err.value)

    broken = tmp_path / "truncated-ckpt"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(RecipeError, match=r"model.path: truncated safetensors file \(its tensors need \d+ bytes, "
                                          r"the file has \d+\): .*model.safetensors"):
        load_recipe(_write(tmp_path, lambda d: d.update(model={"source": "hf_dir", "path": str(broken)})))
    load_recipe(_write(tmp_path, lambda d: d.update(model={"source": "hf_dir", "path": str(tiny_model_dir)})))


def test_reference_backend_refuses_tensor_parallel(tmp_path):
    with pytest.raises(RecipeError, match=r"tp=4, but the reference backend runs the model in one process"):
        load_recipe(_write(tmp_path, lambda d: d["targets"][0].update(tp=4)))
