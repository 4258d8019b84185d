"""The reference backend folds weight quantizers at load (mtq.fold_weight): the same logits as the unfolded model,
with the weight quantizers then disabled, and the profile's files untouched. Real ModelOpt on a tiny Llama."""

import hashlib
from pathlib import Path

import pandas as pd
import pytest

from recipes.schema import ReferenceTarget
from tasks.host import machine
from tasks.profiles import build
from tasks.quantization import quantize


@pytest.fixture()
def calib_file(tmp_path):
    from pydoc_data.topics import topics

    path = tmp_path / "calibration.parquet"
    pd.DataFrame({"text": [t[:400] for t in list(topics.values())[:8]]}).to_parquet(path)
    return str(path)


@pytest.mark.parametrize("fmt", ["fp8", "int8_sq"])
def test_folded_and_unfolded_models_give_the_same_logits(tiny_model_dir, calib_file, fmt):
    import torch

    from tasks.backends import reference

    q = quantize.quantize(model_dir=str(tiny_model_dir), model_fp=f"fp-tiny-{fmt}", calibration_file=calib_file,
                          calib_digest="digest", fmt=fmt, max_tokens=64, batch_size=4)
    art = build.build(model_slug="tiny", checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint, fmt=fmt,
                      quant_algo=q.quant_algo, target=ReferenceTarget(name="local"), device=machine.local_device())
    before = _digests(Path(art.path))
    unfolded, tokenizer = reference.load_model(Path(art.path), fold=False)
    folded, _ = reference.load_model(Path(art.path))
    ids = tokenizer(["Quantization reduces the memory of large models.", "The quick brown fox"],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = unfolded(**ids).logits, folded(**ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    def weight_quantizers(model, enabled):
        return [n for n, m in model.named_modules() if n.endswith("weight_quantizer") and m.is_enabled == enabled]

    assert weight_quantizers(unfolded, True) and not weight_quantizers(folded, True)  # folded: none runs per forward
    assert [n for n, m in folded.named_modules() if n.endswith("input_quantizer") and m.is_enabled]  # activations do
    w = dict(unfolded.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(dict(folded.named_parameters())["model.layers.0.mlp.down_proj.weight"], w)
    assert _digests(Path(art.path)) == before  # the fold changed the loaded weights, never the profile's files


def _digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}
