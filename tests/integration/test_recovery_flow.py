"""Recovery rungs through the whole flow on the tiny Llama: a PTQ rung that fails its perplexity gate is followed by
AutoQuantize and QAT rungs, which are built, validated, gated and recorded like PTQ rungs, and cached on rerun."""

import pytest
import yaml

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama trained for a few hundred steps on pydoc text: a random-init model predicts near-uniformly, so
    INT4 barely moves its perplexity; a trained one loses measurably (what a PTQ accuracy failure looks like)."""
    import shutil
    from pydoc_data.topics import topics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("trained-llama")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor(tok("\n\n".join(topics.values()))["input_ids"][:64 * 2000]).view(-1, 64)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        batch = ids[torch.randint(0, len(ids), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out)
    return out


def test_recovery_rungs_run_after_an_accuracy_failure_go_through_gates_and_are_cached(
        prefect_harness, trained_model_dir, tmp_path):
    from flows.pipeline import certify
    from registry import client as registry_client

    recipe = {
        "name": "recover", "model": {"source": "hf_dir", "path": str(trained_model_dir), "name": "tiny"},
        "calibration": {"source": "pydoc_topics", "samples": 8, "max_tokens": 64, "holdout_fraction": 0.5},
        "quantization": {"formats": ["int4_awq"]},
        "targets": [{"name": "local"}],
        "evaluation": {"tasks": ["holdout_perplexity"], "limit": 300, "batch_size": 8, "max_length": 128},
        "latency": {"requests": 1, "warmup": 0, "input_tokens": 8, "output_tokens": 2},
        "gates": {"accuracy": {"tasks": {"holdout_perplexity": {"max_relative_increase": 0.005}},
                               "bootstrap": 500}},
        "ladder": {"strategy": "best_measured"},
        "recovery": {"auto_quantize": {"formats": ["int4_awq", "fp8"], "effective_bits": 9.0, "score_batches": 1},
                     "qat": {"steps": 3, "lr": 1e-4, "seq_len": 32, "batch_size": 2, "samples": 16}},
        "registry": {"name": "tiny"}}
    path = tmp_path / "recover.yaml"
    path.write_text(yaml.safe_dump(recipe))

    first = certify(str(path), return_state=True).result(raise_on_failure=False)
    assert not first["errors"], first["errors"]
    rows = {r["format"]: r for r in first["rows"]}
    assert rows["int4_awq"]["status"] == "fail", rows["int4_awq"]["verdicts"]
    for name in ("auto_quantize", "int4_awq+qat"):
        row = rows[name]
        assert row["status"] in ("pass", "fail", "undecided"), row
        [ppl] = [v for v in row["verdicts"] if v["gate"] == "holdout_perplexity"]
        assert ppl["value"] is not None and ppl["bound"] is not None
        assert row["recovery"]["recovered_from"] == "int4_awq"
    assert rows["auto_quantize"]["recovery"]["config"]["effective_bits_budget"] == 9.0
    assert len(rows["int4_awq+qat"]["recovery"]["loss_curve"]) == 3
    history = registry_client.client().get_metric_history(rows["int4_awq+qat"]["run_id"], "qat.kl_loss")
    assert [m.step for m in history] == [0, 1, 2]
    assert [s["subject"] for s in first["stages"] if s["stage"] == "recover"] == ["auto_quantize@local",
                                                                                "int4_awq+qat@local"]

    second = certify(str(path), return_state=True).result(raise_on_failure=False)
    recovered = [s for s in second["stages"] if s["stage"] == "recover"]
    assert len(recovered) == 2 and all(s["cached"] for s in recovered)
