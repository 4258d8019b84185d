"""Shared fixtures: an isolated store per test, and a tiny Llama + tokenizer made here (no hub, no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before any test imports Prefect, MLflow or Hugging Face libraries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DISABLE_MULTIPROC", "1")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own artifact store and MLflow database."""
    home = tmp_path / "ewhome"
    monkeypatch.setenv("ENGINEWRIGHT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def _tiny_tokenizer():
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 64) with a 512-token BPE tokenizer, saved as an HF checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    _tiny_tokenizer().save_pretrained(out)
    return out


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def chat_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama with a ChatML chat template on its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """make(hidden) -> a 2-layer GPT-2 (transformers Conv1D layers, head size 64) saved as an HF checkpoint, with
    a tokenizer that has no pad token (as GPT-2's)."""
    made: dict[int, Path] = {}

    def make(hidden: int) -> Path:
        if hidden not in made:
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

            out = tmp_path_factory.mktemp(f"tiny-gpt2-{hidden}")
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=hidden, n_layer=2, n_head=hidden // 64,
                                               n_positions=256, bos_token_id=1, eos_token_id=2))
            model.config.architectures = ["GPT2LMHeadModel"]
            model.save_pretrained(out)
            tok = _tiny_tokenizer()
            PreTrainedTokenizerFast(tokenizer_object=tok._tokenizer, bos_token="<s>", eos_token="</s>",
                                    unk_token="<unk>").save_pretrained(out)
            made[hidden] = out
        return made[hidden]

    return make


@pytest.fixture()
def calib_file(tmp_path) -> str:
    """A calibration parquet of 16 pydoc paragraphs (400 characters each), as the quantize stage reads it."""
    from pydoc_data.topics import topics

    import pandas as pd

    path = tmp_path / "calibration.parquet"
    pd.DataFrame({"text": [t[:400] for t in list(topics.values())[:16]]}).to_parquet(path)
    return str(path)
