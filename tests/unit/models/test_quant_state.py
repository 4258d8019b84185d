"""The quantizer state restored onto the base weights computes exactly what the in-memory quantized model did."""

from pathlib import Path

import pandas as pd
import pytest

from tasks.models import quant_state


def _quantized_in_memory(model_dir, fmt):
    import modelopt.torch.quantization as mtq
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.quantization import quantize

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = quantize.build_quant_config(fmt, kv_cache="none", awq_block_size=64 if fmt == "int4_awq" else None)
    torch.manual_seed(1)
    calib = torch.randint(4, 512, (4, 48))
    with quant_state.recording_folds() as folds:
        mtq.quantize(model, cfg, lambda m: m(input_ids=calib, use_cache=False))
    return model, folds


@pytest.mark.parametrize("fmt", ["fp8", "int4_awq", "int8_sq"])
def test_restored_state_gives_the_quantized_models_logits(tiny_model_dir, tmp_path, fmt):
    import torch
    from transformers import AutoModelForCausalLM

    quantized, folds = _quantized_in_memory(tiny_model_dir, fmt)
    assert bool(folds) == (fmt != "fp8")  # AWQ and SmoothQuant fold scales into the weights; FP8 does not
    ids = torch.randint(4, 512, (2, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = quantized(input_ids=ids).logits
    quant_state.save(quantized, tmp_path, base_fingerprint="base-fp", folds=folds)
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 200_000  # state, not weights

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    restored = quant_state.restore(base, tmp_path, base_fingerprint="base-fp")
    with torch.no_grad():
        got = restored(input_ids=ids).logits
    assert torch.equal(got, expected)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.equal(plain(input_ids=ids).logits, expected)  # the quantizers do change the output
    with pytest.raises(quant_state.QuantStateError, match="re-quantize"):
        quant_state.restore(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path, base_fingerprint="other")


def test_state_encoding_is_canonical_and_round_trips():
    import torch

    state = {"b": {-1: 64, "type": "static"}, "a": (8, torch.Size([2, 3]), torch.bfloat16, None, 1.5)}
    reordered = {"a": state["a"], "b": {"type": "static", -1: 64}}
    assert quant_state.encode(state) == quant_state.encode(reordered)
    import json
    assert (json.dumps(quant_state.encode(state), sort_keys=True)
            == json.dumps(quant_state.encode(reordered), sort_keys=True))
    assert quant_state.decode(json.loads(json.dumps(quant_state.encode(state)))) == state
    with pytest.raises(TypeError, match="set"):
        quant_state.encode({"x": {1, 2}})


def test_two_quantizations_of_the_same_inputs_have_one_fingerprint(tiny_model_dir, tmp_path, monkeypatch):
    from pydoc_data.topics import topics

    from tasks import store
    from tasks.quantization import quantize

    calib = tmp_path / "calibration.parquet"
    pd.DataFrame({"text": [t[:400] for t in list(topics.values())[:8]]}).to_parquet(calib)
    kw = dict(model_dir=str(tiny_model_dir), model_fp="m", calibration_file=str(calib), calib_digest="c",
              fmt="int4_awq", max_tokens=48, batch_size=4)
    first = quantize.quantize(**kw)
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(tmp_path / "second-home"))
    second = quantize.quantize(**kw)
    assert not second.cached and second.fingerprint == first.fingerprint
    for name in (quant_state.STATE_JSON, quant_state.STATE_TENSORS):
        assert (Path(first.fakequant_dir) / name).read_bytes() == (Path(second.fakequant_dir) / name).read_bytes()
    weights = Path(first.fakequant_dir) / "model.safetensors"
    assert weights.stat().st_ino == (Path(tiny_model_dir) / "model.safetensors").stat().st_ino  # linked, not copied
    assert not (Path(first.fakequant_dir) / store.MANIFEST).exists()
    # the export's shards were hashed while written: the recorded digests are the files' digests
    manifest = store.read_manifest(Path(first.path))
    assert any(rel.startswith("unified/") and rel.endswith(".safetensors") for rel in manifest["files"])
    assert store.verify(Path(first.path), full=True) == []
