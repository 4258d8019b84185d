"""Import: turn a model source (HF directory, GGUF file, hub id) into a local HF checkpoint with a content
fingerprint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from recipes.schema import ModelSpec, resolve_path
from tasks import store
from tasks.host import machine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArtifact:
    name: str
    path: str
    fingerprint: str
    source: str
    cached: bool = False


def source_key(spec: ModelSpec, base_dir: Path) -> str:
    """What identifies the source before any conversion: file bytes, directory content, or hub id + revision."""
    if spec.source == "gguf":
        path = resolve_path(spec.path, base_dir)
        return store.key_of("gguf", store.cached_sha256(path))
    if spec.source == "hf_dir":
        return store.key_of("hf_dir", store.source_dir_digest(resolve_path(spec.path, base_dir)))
    return store.key_of("hub", spec.id, spec.revision)


def fingerprint_in_place(spec: ModelSpec, base_dir: Path) -> str:
    """The fingerprint of a local HF directory, which is used in place (the run's and `plan`'s)."""
    return store.source_dir_digest(resolve_path(spec.path, base_dir))


def out_dir(spec: ModelSpec, base_dir: Path) -> Path:
    """Where a converted (GGUF or hub) model is stored."""
    return store.stage_dir("models", source_key(spec, base_dir))


def _load_source(spec: ModelSpec, base_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.source == "gguf":
        path = resolve_path(spec.path, base_dir)
        kwargs = {"gguf_file": path.name}
        location = str(path.parent)
    else:  # hub: downloads through huggingface_hub (needs network or a populated HF cache)
        kwargs = {"revision": spec.revision}
        location = spec.id
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    return model, tokenizer


def import_model(spec: ModelSpec, base_dir: Path) -> ModelArtifact:
    """Produce an HF checkpoint directory for the model and fingerprint it by content (weights + config bytes).

    A local HF directory is used in place. GGUF files and hub ids are converted once and stored by source key.
    """
    if spec.source == "hf_dir":
        path = resolve_path(spec.path, base_dir)
        return ModelArtifact(spec.slug, str(path), fingerprint_in_place(spec, base_dir), f"hf_dir:{path}", cached=True)

    key = source_key(spec, base_dir)
    out = out_dir(spec, base_dir)
    with store.claim(out) as manifest:
        if manifest is not None:
            return ModelArtifact(spec.slug, str(out), manifest["content_hash"], manifest["source"], cached=True)
        log.info("importing %s (%s)", spec.slug, spec.source)
        try:
            model, tokenizer = _load_source(spec, base_dir)
        except Exception as exc:  # the libraries' errors rarely name the file they could not read
            where = resolve_path(spec.path, base_dir) if spec.path else f"{spec.id}@{spec.revision or 'main'}"
            raise ValueError(f"model: cannot load {spec.source} {where}: {type(exc).__name__}: {exc}") from exc
        # transformers 5 leaves `architectures` unset for GGUF loads; ModelOpt's export iterates over it.
        model.config.architectures = [type(model).__name__]
        with store.atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = f"{spec.source}:{spec.path or spec.id}" + (f"@{spec.revision}" if spec.revision else "")
            manifest = store.write_manifest(tmp, {"stage": "import", "key": key, "source": source, "source_key": key,
                                                  "architecture": type(model).__name__,
                                                  "toolchain": machine.toolchain()})
    return ModelArtifact(spec.slug, str(out), manifest["content_hash"], source)
