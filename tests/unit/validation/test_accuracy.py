import pandas as pd
import pytest

from recipes.schema import EvaluationSpec, ReferenceTarget
from tasks import store
from tasks.host import machine
from tasks.profiles import build
from tasks.validation import accuracy


def test_cloze_items_have_known_answers_and_are_deterministic():
    texts = ["The quick brown fox jumps over the lazy sleeping dog tonight. More text follows here.",
             "Python evaluates expressions from left to right in most ordinary situations."]
    items = accuracy.cloze_items(texts)
    assert items == accuracy.cloze_items(texts)
    assert items[0]["choices"][items[0]["label"]] == "tonight"
    assert items[0]["context"].endswith("lazy sleeping dog")
    assert len(set(items[0]["choices"])) == 4


def test_lm_eval_runs_local_tasks_on_a_built_profile(tiny_model_dir, tmp_path):
    from pydoc_data.topics import topics

    holdout = tmp_path / "holdout.parquet"
    pd.DataFrame({"text": [t[:600] for t in list(topics.values())[:30] if len(t) > 200]}).to_parquet(holdout)
    art = build.build(model_slug="tiny", checkpoint_dir=str(tiny_model_dir), checkpoint_fp="base", fmt="none",
                      quant_algo=None, target=ReferenceTarget(name="local"), device=machine.local_device())
    spec = EvaluationSpec(tasks=["holdout_perplexity", "holdout_cloze"], limit=6, batch_size=4, max_length=128)
    res = accuracy.measure_accuracy(profile_dir=art.path, profile_fp=art.fingerprint, backend_name="reference",
                                    spec=spec, holdout_file=str(holdout))
    assert res.metrics["holdout_perplexity"]["word_perplexity"] > 1
    assert 0 <= res.metrics["holdout_cloze"]["acc"] <= 1
    items = pd.read_parquet(res.items_file)
    ppl = items[items.task == "holdout_perplexity"]
    assert len(ppl) == 6 and (ppl.loglikelihood < 0).all() and (ppl.words > 0).all()
    assert len(items[items.task == "holdout_cloze"]) == 6
    again = accuracy.measure_accuracy(profile_dir=art.path, profile_fp=art.fingerprint, backend_name="reference",
                                      spec=spec, holdout_file=str(holdout))
    assert again.cached and again.metrics == res.metrics


def test_a_held_out_split_smaller_than_the_limit_is_refused(tmp_path):
    import pandas as pd

    from recipes.schema import EvaluationSpec, RecipeError
    from tasks.validation.accuracy import check_item_counts

    holdout = tmp_path / "holdout.parquet"
    pd.DataFrame({"text": ["The quick brown fox jumps over the lazy sleeping hound dog today.",
                           "A second paragraph with enough words to make one cloze item from it again."]}
                 ).to_parquet(holdout)
    spec = EvaluationSpec(tasks=["holdout_perplexity", "holdout_cloze"], limit=100)
    with pytest.raises(RecipeError, match=r"evaluation.limit=100, but the held-out split \(2 texts\) gives only "
                                          r"holdout_perplexity 2, holdout_cloze 2 item\(s\): lower evaluation.limit"):
        check_item_counts(spec, str(holdout))
    check_item_counts(EvaluationSpec(tasks=["holdout_perplexity"], limit=2), str(holdout))


def test_a_bf16_profile_is_scored_in_float32(tiny_model_dir, tmp_path):
    """CUDA profiles run in bf16; lm-eval sums a window's log-probs in the model's dtype unless told otherwise, which
    rounds each item's log-likelihood to bf16's step (several nats) -- noise the size of a 0.5 % perplexity gate."""
    from pydoc_data.topics import topics

    import torch
    import yaml
    from lm_eval.api.instance import Instance

    from tasks.backends import reference

    profile = tmp_path / "profile"
    store.link_or_copy_tree(tiny_model_dir, profile / reference.CHECKPOINT)
    (profile / reference.backend.RUNTIME_FILE).write_text(yaml.safe_dump(
        {"backend": "reference", "device": "cpu", "dtype": "bfloat16", "max_batch_size": 1, "max_seq_len": 256}))
    text = " ".join(topics["assignment"].split()[:60])
    with reference.lm_eval_model(profile, batch_size=1, max_length=256) as lm:
        [got] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
        ids = [lm.prefix_token_id] + lm.tok_encode(text)
        assert len(ids) <= 256  # one window: the sum below is the whole item
        with torch.no_grad():
            logits = lm.model(torch.tensor([ids])).logits[0, :-1].float()
        expected = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert got == pytest.approx(expected, abs=1e-3)


def test_lm_eval_results_point_at_the_output_not_the_deleted_temp_dir(tmp_path):
    import json

    from tasks.validation.accuracy import _write_lm_eval_results

    tmp, final = tmp_path / ".tmp-abc", tmp_path / "accuracy" / "key"
    results = {"configs": {"holdout_cloze": {"dataset_kwargs": {"data_files": {"test": str(tmp / "cloze.jsonl")}}}},
               "samples": {"x": []}}
    out = tmp_path / "results.json"
    _write_lm_eval_results(results, out, written_in=tmp, final=final)
    written = json.loads(out.read_text())
    assert written["configs"]["holdout_cloze"]["dataset_kwargs"]["data_files"]["test"] == str(final / "cloze.jsonl")
    assert "samples" not in written and str(tmp) not in out.read_text()
