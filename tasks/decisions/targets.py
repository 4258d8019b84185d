"""GPU targets as data: the GPU catalogue, which (format, architecture, runtime, release) combinations are valid,
and the plan of (format, target) pairs.

Everything here is decided before any GPU time is spent: an invalid pair is skipped with its reason. Validity is a
list of rules, each with its source next to it (VALIDITY_RULES, KV_CACHE_RULES, ENGINE_RELEASES): a pair is valid
only when a rule allows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# name -> (compute capability, memory GiB). Names are matched case-insensitively. H100 and H20 share sm_90 but differ
# in memory and SM count: registry versions also carry the GPU name (see gpu_matches, registry resolve).
GPU_CATALOGUE: dict[str, tuple[str, int]] = {
    "A100": ("sm_80", 80), "A30": ("sm_80", 24), "A10": ("sm_86", 24), "A10G": ("sm_86", 24), "A40": ("sm_86", 48),
    "L4": ("sm_89", 24), "L40": ("sm_89", 48), "L40S": ("sm_89", 48),
    "H100": ("sm_90", 80), "H200": ("sm_90", 141), "GH200": ("sm_90", 96), "H20": ("sm_90", 96),
    "B200": ("sm_100", 192), "GB200": ("sm_100", 192), "B300": ("sm_103", 288), "GB300": ("sm_103", 288),
    "RTX-PRO-6000": ("sm_120", 96), "RTX-5090": ("sm_120", 32),
}

# The TensorRT-LLM release of the GPU worker image (docker/trtllm.Dockerfile's TRTLLM_IMAGE; a unit test keeps the
# two equal). A trtllm target's `trtllm_version` defaults to it.
DEFAULT_TRTLLM_VERSION = "1.3.0rc21"

AMPERE, ADA, HOPPER = frozenset({80, 86, 87}), frozenset({89}), frozenset({90})
BLACKWELL_DC, BLACKWELL_RTX = frozenset({100, 103}), frozenset({120})

SRC_MODELOPT_MATRIX = ("ModelOpt docs/source/guides/0_support_matrix.rst (NVIDIA/Model-Optimizer a2fbac7, 0.47.0dev): "
                       "FP4 Blackwell+, FP8 Ada+, INT8-SQ Ampere+, W4A16 AWQ Ampere+, W4A8 AWQ Ada+")
SRC_TRTLLM_TABLE = ("TensorRT-LLM docs/source/features/quantization.md, 'Hardware Support Matrix' (PyTorch backend; "
                    "read at 09d4c79b and f53fb4c8)")
SRC_PR_10190 = ("TensorRT-LLM PR #10190 'sm100 weight-only kernel' (merged 2026-01-05, commit 656c705ff1; main then "
                "bumped to 1.2.0rc8) and the later quantization.md table marking W4A8/W4A16 AWQ 'Y' for sm100/103; "
                "taken as from 1.3.0rc0 on, since the 1.2.x finals came from the 1.2 release branch")
SRC_LEGACY_BUILDER = ("TensorRT-LLM tensorrt_llm/builder.py::build (1.x): raises on SM 100-119 for SmoothQuant and "
                      "INT4/INT8 weight-only")
SRC_RC20 = ("TensorRT-LLM v1.3.0rc20 release notes (2026-06-30): 'the last one supporting the TensorRT backend'; "
            "PR #15918 removed tensorrt_llm._tensorrt_engine, docs/source/legacy/tensorrt-backend-removal.md")
SRC_UNIFIED_MIN = ("ModelOpt docs/source/deployment/3_unified_hf.rst: minimum TensorRT-LLM v1.2.0 for unified "
                   "checkpoints")


# vLLM (runtime "vllm"), read from the released vLLM 0.26.0 wheel (commit ffd46bfab).
SRC_VLLM_MODELOPT = ("vLLM 0.26.0 vllm/model_executor/layers/quantization/modelopt.py: QUANT_ALGOS (L105-120) FP8, "
                     "FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8, MIXED_PRECISION; anything else "
                     "is refused ('ModelOpt currently only supports ...', L354-360)")
SRC_VLLM_FP8 = SRC_VLLM_MODELOPT + "; ModelOptFp8Config.get_min_capability 89 (L412)"
SRC_VLLM_NVFP4 = (SRC_VLLM_MODELOPT + "; ModelOptNvFp4Config.get_min_capability 75 (L1064); below sm_100 NVFP4 runs as "
                  "weight-only FP4 with bf16 activations through MarlinNvFp4LinearKernel (model_executor/kernels/"
                  "linear/__init__.py L446-459, nvfp4/marlin.py L34-39): W4A16 numerics and speed, not W4A4")
SRC_VLLM_KV = ("vLLM 0.26.0 modelopt.py KV_CACHE_QUANT_ALGOS (L121) FP8, NVFP4, read by --kv-cache-dtype auto "
               "(utils/torch_utils.py L310-395: fp8 -> fp8_e4m3); FP8 KV cache on CPU needs AVX-512 or AMX "
               "(v1/attention/backends/cpu_attn.py L540-543)")
VLLM_NO_GPU = ("vLLM's CPU build serves no ModelOpt quantized checkpoint: every ModelOpt method needs a CUDA GPU "
               "(get_min_capability 75-89, " + SRC_VLLM_MODELOPT.split(":")[0] + ")")

@dataclass(frozen=True)
class Rule:
    """`format` may be served on these SMs by this runtime, in TensorRT-LLM releases matching `releases` (a PEP 440
    specifier; "" = every release read). runtime: "pytorch" (engine: profile), "legacy" (TensorRT engine), or
    "reference" (transformers + ModelOpt fake quant: ModelOpt's deployment matrix decides)."""
    format: str
    sms: frozenset[int]
    runtime: str
    source: str
    releases: str = ""

    def allows(self, fmt: str, sm: int, runtime: str, release: str | None) -> bool:
        return (self.format == fmt and sm in self.sms and self.runtime == runtime
                and (not self.releases or release is None or _in_range(release, self.releases)))


_ALL = AMPERE | ADA | HOPPER | BLACKWELL_DC | BLACKWELL_RTX
_ADA_ON = ADA | HOPPER | BLACKWELL_DC | BLACKWELL_RTX
# ModelOpt's "X and later": every SM from the first of that generation on.
_MODELOPT = {"nvfp4": frozenset(range(100, 200)), "fp8": frozenset(range(89, 200)),
             "int8_sq": frozenset(range(80, 200)), "int4_awq": frozenset(range(80, 200)),
             "w4a8_awq": frozenset(range(89, 200))}
VALIDITY_RULES: tuple[Rule, ...] = (
    *(Rule(f, sms, "reference", SRC_MODELOPT_MATRIX) for f, sms in _MODELOPT.items()),
    # PyTorch runtime: the hardware table. INT8-SmoothQuant has no row there (no PyTorch kernels).
    Rule("nvfp4", BLACKWELL_DC | BLACKWELL_RTX, "pytorch", SRC_TRTLLM_TABLE),
    Rule("fp8", _ADA_ON, "pytorch", SRC_TRTLLM_TABLE),
    Rule("w4a8_awq", ADA | HOPPER, "pytorch", SRC_TRTLLM_TABLE),
    Rule("w4a8_awq", BLACKWELL_DC, "pytorch", SRC_PR_10190, releases=">=1.3.0rc0"),
    Rule("int4_awq", AMPERE | ADA | HOPPER, "pytorch", SRC_TRTLLM_TABLE),
    Rule("int4_awq", BLACKWELL_DC, "pytorch", SRC_PR_10190, releases=">=1.3.0rc0"),
    # vLLM: the formats its ModelOpt loader accepts, from the SM its kernels need.
    Rule("fp8", frozenset(range(89, 200)), "vllm", SRC_VLLM_FP8),
    Rule("nvfp4", frozenset(range(75, 200)), "vllm", SRC_VLLM_NVFP4),
    # Legacy TensorRT engine: ModelOpt's matrix minus what the engine builder refuses on SM 100-119.
    *(Rule(f, sms - (frozenset(range(100, 120)) if f in ("int8_sq", "int4_awq") else frozenset()), "legacy",
           SRC_MODELOPT_MATRIX + ("; " + SRC_LEGACY_BUILDER if f in ("int8_sq", "int4_awq") else ""))
      for f, sms in _MODELOPT.items()),
)
# KV-cache quantization (recipe quantization.kv_cache) -> rules. The reference backend computes any of them.
KV_CACHE_RULES: tuple[Rule, ...] = (
    *(Rule(kv, _ALL, rt, SRC_TRTLLM_TABLE + ": FP8 KV Cache 'Y' from Ampere on")
      for kv in ("fp8", "fp8_cast") for rt in ("pytorch", "legacy")),
    *(Rule(kv, BLACKWELL_DC, "pytorch", "TensorRT-LLM quantization.md (newer table, 'NVFP4 KV Cache' column: sm100/103 "
           "only); KvCacheConfig(dtype='nvfp4') in llmapi/llm_args.py") for kv in ("nvfp4", "nvfp4_cast")),
    *(Rule(kv, frozenset(range(89, 200)), "vllm", SRC_VLLM_KV) for kv in ("fp8", "fp8_cast")),
    *(Rule(kv, BLACKWELL_DC, "vllm", SRC_VLLM_KV + "; --kv-cache-dtype nvfp4 (config/cache.py CacheDType)")
      for kv in ("nvfp4", "nvfp4_cast")),
)
# Where a runtime's refusal of what it has no rule for is written down.
REFUSAL_SOURCES = {"vllm": SRC_VLLM_MODELOPT}
# Which TensorRT-LLM releases can build each engine kind.
ENGINE_RELEASES: dict[str, tuple[str, str]] = {
    "legacy": ("<=1.3.0rc20", SRC_RC20),
    "profile": (">=1.2.0", SRC_UNIFIED_MIN),
}
CUDA_CALIBRATION = {"nvfp4": "NVFP4 calibration needs CUDA (ModelOpt's FP4 kernels); this run quantizes on the CPU"}
CUDA_KV_CALIBRATION = {"nvfp4": "NVFP4 KV-cache calibration needs CUDA (ModelOpt's FP4 kernels); this run quantizes "
                                "on the CPU", "nvfp4_cast": "NVFP4 KV-cache quantization needs CUDA (ModelOpt's FP4 "
                                                            "kernels); this run quantizes on the CPU"}
FORMAT_OF_QUANT_ALGO = {"FP8": "fp8", "NVFP4": "nvfp4", "W4A16_AWQ": "int4_awq", "W4A8_AWQ": "w4a8_awq",
                        "W8A8_SQ_PER_CHANNEL": "int8_sq"}
KV_OF_QUANT_ALGO = {"FP8": "fp8", "NVFP4": "nvfp4"}


def _in_range(release: str, spec: str) -> bool:
    try:
        return Version(release) in SpecifierSet(spec, prereleases=True)
    except InvalidVersion:
        return False


def arch_of(gpu: str) -> str:
    """'H100' -> 'sm_90'; 'sm_90' -> 'sm_90'. 'auto' must be resolved against a device first."""
    if re.fullmatch(r"sm_\d{2,3}", gpu):
        return gpu
    for name, (arch, _) in GPU_CATALOGUE.items():
        if name.lower() == gpu.lower():
            return arch
    raise ValueError(f"unknown GPU '{gpu}': use 'auto', 'sm_XY', or one of {', '.join(GPU_CATALOGUE)}")


def recipe_gpu_problems(recipe) -> list[str]:
    """Each target whose `gpu` is neither 'auto', 'sm_XY' nor a catalogue name, naming its field: recipes/ lies on a
    floor below this catalogue, so the CLI and the flows hand this check to recipes.load.load_recipe."""
    problems = []
    for i, target in enumerate(recipe.targets):
        if target.gpu == "auto":
            continue
        try:
            arch_of(target.gpu)
        except ValueError as exc:
            problems.append(f"targets.{i}.gpu (target '{target.name}'): {exc}")
    return problems


def gpu_matches(name: str, device_name: str | None) -> bool:
    """Whether a catalogue name ('H20') names this device ('NVIDIA H20'); 'H20' does not match 'NVIDIA H200'."""
    words = re.split(r"[\s_]+", (device_name or "").upper().replace("NVIDIA", ""))
    joined = "-".join(w for w in words if w)
    return bool(re.search(rf"(^|-){re.escape(name.upper())}(-|$)", joined))


def sm_number(arch: str) -> int | None:
    match = re.fullmatch(r"sm_(\d+)", arch)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TargetRuntime:
    """What the validity rules need to know of a target's runtime, as its backend declares it
    (``tasks.backends.target_runtime``): decisions compare these facts, never backend names."""
    runtime: str  # the rules' key: "reference", "pytorch" / "legacy" (TensorRT-LLM), ...
    release: str | None = None  # the runtime's release on the target's worker, when rules depend on it
    kv_cache_dtype: str = "auto"  # the runtime's own KV-cache dtype option, where it has one
    checkpoint_per_tp: bool = False  # builds from a TensorRT-LLM checkpoint exported per tp (INT8-SQ, legacy)
    needs_gpu: str | None = None  # why it cannot run without an NVIDIA GPU (None: it can)
    no_gpu_quantized: str | None = None  # why it serves no quantized format without a GPU (None: it does)


ENGINE_OF_RUNTIME = {"pytorch": "profile", "legacy": "legacy"}  # TensorRT-LLM's engine kinds (targets[].engine)
RUNTIME_NAMES = {"pytorch": "TensorRT-LLM's PyTorch runtime", "legacy": "TensorRT-LLM's legacy TensorRT engine",
                 "reference": "its deployment runtimes", "vllm": "vLLM"}
RELEASE_NAMES = {"pytorch": "TensorRT-LLM", "legacy": "TensorRT-LLM", "vllm": "vLLM"}


def engine_reason(engine: str, release: str) -> str | None:
    """Why TensorRT-LLM `release` cannot build this engine kind, or None when it can."""
    spec, source = ENGINE_RELEASES[engine]
    if _in_range(release, spec):
        return None
    instead = ("run the target on a worker whose image is TensorRT-LLM <= 1.3.0rc20 (e.g. "
               "nvcr.io/nvidia/tensorrt-llm/release:1.2.1) and set targets[].trtllm_version to it, or use engine: "
               "profile") if engine == "legacy" else "use a TensorRT-LLM >= 1.2.0 image"
    return f"engine: {engine} needs TensorRT-LLM {spec}; this target's image is {release} ({source}); {instead}"


def _sm_list(sms) -> str:
    """{89, 90, 100, 103, 120} -> 'sm_89, sm_90, sm_100, sm_103, sm_120'; range(80, 200) -> 'sm_80+'."""
    parts, run = [], []
    for sm in sorted(sms) + [None]:
        if run and (sm is None or sm != run[-1] + 1):
            parts.append(f"sm_{run[0]}+" if run[-1] >= 199 else
                         f"sm_{run[0]}-sm_{run[-1]}" if len(run) > 3 else ", ".join(f"sm_{x}" for x in run))
            run = []
        if sm is not None:
            run.append(sm)
    return ", ".join(parts)


def _rule_reason(rules, kind: str, what: str, sm: int, runtime: str, release: str | None, arch: str) -> str | None:
    if any(r.allows(what, sm, runtime, release) for r in rules):
        return None
    mine = [r for r in rules if r.format == what and r.runtime == runtime]
    where = RUNTIME_NAMES[runtime]
    if not mine:
        hint = " (set targets[].engine: legacy)" if what == "int8_sq" and runtime == "pytorch" else ""
        source = f" (source: {REFUSAL_SOURCES[runtime]})" if runtime in REFUSAL_SOURCES else ""
        release_note = f" {release}" if release and runtime in REFUSAL_SOURCES else ""
        return f"{kind} {what} has no kernels in {where}{release_note}{hint}; target is {arch}{source}"
    product = RELEASE_NAMES.get(runtime, runtime)
    archs = [_sm_list(r.sms) + (f" ({product} {r.releases})" if r.releases else "") for r in mine]
    release_note = f" ({product} {release})" if release and runtime in RELEASE_NAMES else ""
    return (f"{kind} {what} is not served by {where} on {arch}{release_note}; allowed: {', '.join(archs)} "
            f"(sources: {'; '.join(sorted({r.source for r in mine}))})")


def invalid_reason(fmt: str, arch: str, *, runtime: TargetRuntime, quant_device: str,
                   kv_cache: str = "none") -> str | None:
    """Why this format cannot be built/served for this arch by this runtime (None: it can). `kv_cache` is the
    recipe's KV quantization; the runtime's release and own KV-cache dtype come with `runtime`."""
    sm = sm_number(arch)
    kind, release = runtime.runtime, runtime.release
    if sm is None and runtime.needs_gpu:
        return f"{runtime.needs_gpu}; target is {arch}"
    if sm is None and runtime.no_gpu_quantized:
        return f"{runtime.no_gpu_quantized}; target is {arch}"
    if sm is not None:
        engine = ENGINE_OF_RUNTIME.get(kind)
        if engine is not None and release is not None and (why := engine_reason(engine, release)):
            return why
        if why := _rule_reason(VALIDITY_RULES, "format", fmt, sm, kind, release, arch):
            return why
        if kv_cache != "none" and any(r.runtime == kind for r in KV_CACHE_RULES) and (
                why := _rule_reason(KV_CACHE_RULES, "KV cache", kv_cache, sm, kind, release, arch)):
            return why
        if runtime.kv_cache_dtype != "auto" and (
                why := _rule_reason(KV_CACHE_RULES, "kv_cache_dtype", runtime.kv_cache_dtype, sm, kind, release, arch)):
            return why
    if fmt in CUDA_CALIBRATION and quant_device != "cuda":
        return CUDA_CALIBRATION[fmt]
    if kv_cache in CUDA_KV_CALIBRATION and quant_device != "cuda":
        return CUDA_KV_CALIBRATION[kv_cache]
    return None


@dataclass(frozen=True)
class Pair:
    format: str
    target: str
    arch: str
    skip_reason: str | None = None


@dataclass
class Plan:
    pairs: list[Pair] = field(default_factory=list)
    target_arch: dict[str, str] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)  # target -> why it cannot run from here
    format_order: list[str] = field(default_factory=list)  # the recipe's ladder order

    @property
    def runnable(self) -> list[Pair]:
        return [p for p in self.pairs if p.skip_reason is None]

    @property
    def formats_to_quantize(self) -> list[str]:
        """Formats valid for at least one target's architecture, placed here or not: quantization happens once,
        where the flow runs, and is shared by every target (a pool's workers read it from the shared store)."""
        wanted = {p.format for p in self.pairs if p.skip_reason in (None, self.unplaced.get(p.target))}
        return [f for f in self.format_order if f in wanted]


def resolve_target_arch(target, local: dict) -> str:
    return local["arch"] if target.gpu == "auto" else arch_of(target.gpu)


def make_plan(recipe, local: dict, *, runtime_of, dispatch: bool = False) -> Plan:
    """Every (format, target) pair in recipe order; invalid or unplaceable ones carry their skip reason.
    `runtime_of(target) -> TargetRuntime` gives each target's runtime facts (``tasks.backends.target_runtime``).

    A target whose architecture differs from this machine's runs only when `dispatch` is on (a Prefect server is
    reachable) and the target names a work pool; otherwise it is unplaced, with the reason.
    """
    plan = Plan(format_order=list(recipe.quantization.formats))
    for target in recipe.targets:
        arch = resolve_target_arch(target, local)
        plan.target_arch[target.name] = arch
        if arch != local["arch"] and not (dispatch and target.work_pool):
            plan.unplaced[target.name] = (
                f"target '{target.name}' needs {arch} but this machine is {local['arch']}; " + (
                    f"it runs on a worker of its pool '{target.work_pool}' (`enginewright deploy` makes one "
                    f"deployment per pool; run that deployment)" if target.work_pool else
                    "set targets[].work_pool to a Prefect work pool whose workers have that GPU"))
        for fmt in recipe.quantization.formats:
            reason = invalid_reason(fmt, arch, runtime=runtime_of(target), quant_device=local["device"],
                                    kv_cache=recipe.quantization.kv_cache)
            reason = reason or plan.unplaced.get(target.name)
            plan.pairs.append(Pair(fmt, target.name, arch, reason))
    return plan
