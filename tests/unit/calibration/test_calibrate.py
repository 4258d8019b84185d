import json

import pandas as pd
import pytest

from recipes.schema import CalibrationSpec
from tasks.calibration import calibrate


def spec(**kw):
    return CalibrationSpec(**({"source": "pydoc_topics", "samples": 16, "max_tokens": 64} | kw))


def test_holdout_never_overlaps_calibration_and_does_not_depend_on_n():
    texts = calibrate._pydoc_paragraphs()
    small, hold_small, _ = calibrate.split_and_sample(texts, spec(samples=8))
    large, hold_large, _ = calibrate.split_and_sample(texts, spec(samples=64))
    assert hold_small == hold_large
    assert not set(large) & set(hold_large)
    assert 0.1 < len(hold_large) / (len(hold_large) + 500) < 0.4


def test_sampling_is_seeded():
    texts = calibrate._pydoc_paragraphs()
    a, _, _ = calibrate.split_and_sample(texts, spec(seed=1))
    b, _, _ = calibrate.split_and_sample(texts, spec(seed=1))
    c, _, _ = calibrate.split_and_sample(texts, spec(seed=2))
    assert a == b and a != c


def test_duplicates_and_short_texts_are_counted():
    texts = ["x" * 300, "x" * 300, "  " + "x" * 300, "short", ""] + [f"{i} " + "y" * 300 for i in range(50)]
    sample, holdout, counts = calibrate.split_and_sample(texts, spec(samples=5, holdout_fraction=0.2))
    assert counts["duplicates_removed"] == 2
    assert counts["dropped_short_or_empty"] == 2
    assert len(set(sample)) == 5


def test_too_few_texts_names_the_field():
    with pytest.raises(ValueError, match="calibration.samples"):
        calibrate.split_and_sample(["z" * 300] * 3, spec(samples=10))


def test_calibrate_writes_parquet_and_is_cached(tiny_model_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} " + "word " * 60}) + "\n" for i in range(40)))
    s = spec(source="files", paths=[str(data)], samples=10)
    first = calibrate.calibrate(s, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    df = pd.read_parquet(first.calibration_file)
    assert len(df) == 10 and first.stats["count"] == 10 and not first.cached
    assert first.stats["tokens_p50"] > 0 and first.stats["truncated_to_max_tokens"] == 10
    again = calibrate.calibrate(s, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    assert again.cached and again.digest == first.digest
    data.write_text(data.read_text() + json.dumps({"text": "new " * 80}) + "\n")
    changed = calibrate.calibrate(s, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    assert not changed.cached  # source content is part of the key


def test_wrong_text_field_is_named(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a" * 300}) + "\n")
    with pytest.raises(ValueError, match="calibration.text_field"):
        calibrate.calibrate(spec(source="files", paths=[str(data)], samples=1), model_dir=str(tiny_model_dir),
                            base_dir=tmp_path)


def test_packing_reaches_more_sequences_than_there_are_texts(tiny_model_dir, tmp_path):
    """200 short texts (~10-20 tokens each) make 24 sequences of exactly 64 tokens, EOS between texts; quantize then
    calibrates on those token ids."""
    from transformers import AutoTokenizer

    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": f"short note {i}: the value is {i * 7}"}) + "\n" for i in range(200)))
    s = spec(source="files", paths=[str(data)], samples=24, max_tokens=64, min_chars=0, pack=True)
    unpacked = calibrate.calibrate(s.model_copy(update={"pack": False}), model_dir=str(tiny_model_dir),
                                   base_dir=tmp_path)
    assert unpacked.stats["tokens_max"] < 32  # without packing, short texts stay short
    art = calibrate.calibrate(s, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    df = pd.read_parquet(art.calibration_file)
    assert len(df) == 24 and all(len(ids) == 64 for ids in df["input_ids"])
    eos = AutoTokenizer.from_pretrained(tiny_model_dir).eos_token_id
    assert sum(int(t == eos) for ids in df["input_ids"] for t in ids) >= 24 * 64 // 20  # boundaries kept
    assert 24 < art.stats["packed_from_texts"] < 200
    sample_texts = pd.read_parquet(f"{art.path}/sample_texts.parquet")  # the report sees the texts, not 64s
    assert len(sample_texts) == art.stats["packed_from_texts"] and sample_texts["n_tokens"].max() < 64
    with pytest.raises(ValueError, match=r"calibration.pack: 400 sequences x 64 tokens need 25600 tokens"):
        calibrate.calibrate(s.model_copy(update={"samples": 400}), model_dir=str(tiny_model_dir), base_dir=tmp_path)


def test_packing_is_refused_for_request_logs(tmp_path):
    with pytest.raises(ValueError, match="calibration.pack applies to"):
        CalibrationSpec(source="request_log", paths=["x.jsonl"], pack=True)


def test_packed_calibration_feeds_quantize_token_ids(tiny_model_dir, tmp_path):
    from tasks.quantization import quantize

    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": f"note {i}: value {i * 3}"}) + "\n" for i in range(120)))
    s = spec(source="files", paths=[str(data)], samples=8, max_tokens=32, min_chars=0, pack=True)
    art = calibrate.calibrate(s, model_dir=str(tiny_model_dir), base_dir=tmp_path)
    seen = []
    real = quantize.calibration_forward
    quantize.calibration_forward = lambda m, batches: real(m, (seen.append(b["input_ids"].shape) or b for b in batches))
    try:
        q = quantize.quantize(model_dir=str(tiny_model_dir), model_fp="m", calibration_file=art.calibration_file,
                              calib_digest=art.digest, fmt="fp8", max_tokens=32, batch_size=4)
    finally:
        quantize.calibration_forward = real
    assert q.quant_algo == "FP8" and seen and all(tuple(shape) == (4, 32) for shape in seen)
