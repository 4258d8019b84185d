"""The pipeline's quantize stage against bare ModelOpt, on one GPU, in one process, on the same checkpoint and tokens.

Bare ModelOpt is what a user would write: load -> mtq.quantize -> export_hf_checkpoint(dtype=bfloat16). The pipeline
is the stage functions the flow calls (import, quantize, build), timed step by step by wrapping the library calls
they make. A random-weight model of the requested shape stands in for real weights (none can travel to the GPU host);
the calibration set is seeded random token ids packed into samples x seq_len, the format tasks/calibration/calibrate.py
writes with `pack: true`. The record (JSON) is rewritten after every step, so a killed run keeps what it measured.

    python benchmarks/gpu/pipeline_vs_modelopt.py --shape 8b --formats fp8 int4_awq --work /tmp/bench \
        --out benchmarks/gpu/results/h200-pipeline-vs-modelopt.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {  # Llama shapes: hidden, intermediate, layers, heads, kv heads, vocab
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=49152),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=49152),
    "tiny": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=49152),
}
# ModelOpt's hf_ptq.py defaults: 512 samples x 512 tokens; AWQ's search is run on fewer (the 128).
DEFAULT_SAMPLES = {"fp8": 512, "int4_awq": 128}


class Record:
    """The run's measurements, rewritten to disk after each step."""

    def __init__(self, path: Path, **facts):
        self.path, self.data = path, {**facts, "steps": [], "runs": {}}
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def step(self, run: str, name: str, seconds: float, **extra) -> None:
        self.data["steps"].append({"run": run, "step": name, "seconds": round(seconds, 2), **extra})
        print(f"  {run:22s} {name:34s} {seconds:8.2f} s {extra or ''}", flush=True)
        self.flush()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.flush()


def DEVICE() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def DTYPE():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() else torch.float32  # as the pipeline's quantize stage


def peak_gib() -> float | None:
    """Peak GPU memory since the last call (then reset)."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def sync_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_model(shape: str, out: Path, tokenizer_from: Path | None) -> Path:
    """A Llama of the given shape with random bf16 weights (seed 0), saved as an HF checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(out)
    del model
    _tokenizer(tokenizer_from).save_pretrained(out)
    return out


def _tokenizer(source: Path | None):
    from transformers import AutoTokenizer

    if source:
        return AutoTokenizer.from_pretrained(source)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _tiny_tokenizer  # the tests' 512-token BPE (ids < vocab: the model's size is what counts)

    return _tiny_tokenizer()


def calibration_tokens(samples: int, seq_len: int, vocab: int, seed: int = 0):
    import torch

    return torch.randint(3, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def write_calibration(tokens, path: Path) -> Path:
    import pandas as pd

    pd.DataFrame({"text": [""] * len(tokens), "input_ids": tokens.tolist()}).to_parquet(path)
    return path


def written_bytes(directory: Path, exclude_inodes: set[int]) -> int:
    """Bytes of the files under ``directory`` that were written there (hard links to ``exclude_inodes`` are free)."""
    total, seen = 0, set()
    for f in Path(directory).rglob("*"):
        if f.is_file():
            st = f.stat()
            if st.st_ino not in exclude_inodes and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total


def inodes(directory: Path) -> set[int]:
    return {f.stat().st_ino for f in Path(directory).rglob("*") if f.is_file()}


def bare_modelopt(rec: Record, fmt: str, model_dir: Path, tokens, batch_size: int, out: Path) -> dict:
    """What a user writes with ModelOpt alone."""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    from tasks.quantization import quantize

    run = f"bare-modelopt/{fmt}"
    peak_gib()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPE(), device_map=DEVICE()).eval()
    sync_cuda()
    rec.step(run, "load", time.perf_counter() - t0)
    cfg = quantize.build_quant_config(fmt, kv_cache="none", awq_block_size=128 if fmt == "int4_awq" else None)

    def forward_loop(m):
        for i in range(0, len(tokens), batch_size):
            with torch.no_grad():
                m(input_ids=tokens[i:i + batch_size].to(DEVICE()), use_cache=False)

    t = time.perf_counter()
    mtq.quantize(model, cfg, forward_loop)
    sync_cuda()
    rec.step(run, "calibrate + quantize", time.perf_counter() - t)
    t = time.perf_counter()
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(out))
    rec.step(run, "export", time.perf_counter() - t)
    t = time.perf_counter()
    os.sync()
    rec.step(run, "disk sync", time.perf_counter() - t)
    total = time.perf_counter() - t0
    written = written_bytes(out, set())
    rec.step(run, "total", total, disk_bytes=written, peak_gpu_gib=peak_gib())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"seconds": round(total, 2), "disk_bytes": written}


@contextlib.contextmanager
def timing_calls(rec: Record, run: str):
    """Time the library calls the quantize stage makes, by wrapping them where the stage looks them up."""
    import modelopt.torch.export as mte
    import modelopt.torch.quantization as mtq

    from tasks import store
    from tasks.models import placement, quant_state
    from tasks.quantization import quantize

    patches = [(placement, "plan", "placement (config x dtype vs free memory)"),
               (placement, "load_causal_lm", "load"), (mtq, "quantize", "calibrate + quantize"),
               (mtq, "print_quant_summary", "quant summary"),
               (quant_state, "save", "save quantizer state"), (mte, "export_hf_checkpoint", "export"),
               (quantize, "link_base_checkpoint", "link base checkpoint"),
               (store, "write_manifest", "manifest (remaining hashes)")]
    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]

    def wrap(fn, label):
        def timed(*a, **kw):
            t = time.perf_counter()
            result = fn(*a, **kw)
            sync_cuda()
            rec.step(run, label, time.perf_counter() - t)
            return result
        return timed

    for (mod, name, label), (_, _, fn) in zip(patches, originals):
        setattr(mod, name, wrap(fn, label))
    try:
        yield
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)


def pipeline_quantize(rec: Record, fmt: str, model, calib_file: Path, tokens, batch_size: int, base_inodes) -> tuple:
    import torch

    from tasks.quantization import quantize

    run = f"pipeline/{fmt}"
    peak_gib()
    t0 = time.perf_counter()
    with timing_calls(rec, run):
        q = quantize.quantize(model_dir=model.path, model_fp=model.fingerprint, calibration_file=str(calib_file),
                              calib_digest=f"random-{len(tokens)}x{tokens.shape[1]}", fmt=fmt,
                              max_tokens=tokens.shape[1], batch_size=batch_size)
    t = time.perf_counter()
    stage = t - t0
    os.sync()
    rec.step(run, "disk sync", time.perf_counter() - t)
    total = time.perf_counter() - t0
    rec.step(run, "stage function (as the run records it)", stage)
    written = written_bytes(Path(q.path), base_inodes)
    state = sum(f.stat().st_size for f in Path(q.fakequant_dir).glob("quant_state.*"))
    rec.step(run, "total (incl. disk sync)", total, disk_bytes=written, state_bytes=state, cached=q.cached,
             peak_gpu_gib=peak_gib())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return q, {"seconds": round(total, 2), "disk_bytes": written, "state_bytes": state}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--formats", nargs="+", default=["fp8", "int4_awq"])
    ap.add_argument("--samples", type=int, help="calibration sequences (default: 512 for fp8, 128 for int4_awq)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ew-bench"))
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer directory (default: the tests' tiny BPE)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/gpu/results/pipeline-vs-modelopt.json")
    ap.add_argument("--repeat", type=int, default=1, help="bare/pipeline pairs per format (the best of each kept)")
    ap.add_argument("--trust-extras", action="store_true",
                    help="also time import+quantize+build rerun, full digest verification and an MLflow upload")
    args = ap.parse_args()

    import torch

    os.environ["ENGINEWRIGHT_HOME"] = str(args.work / "home")
    from recipes.schema import ModelSpec, ReferenceTarget
    from tasks import store
    from tasks.host import machine
    from tasks.models import import_model, warmup
    from tasks.profiles import build
    from tasks.quantization import quantize

    rec = Record(args.out, shape={"name": args.shape, **SHAPES[args.shape]}, device=machine.local_device(),
                 toolchain=machine.toolchain(), seq_len=args.seq_len, batch_size=args.batch_size)
    if torch.cuda.is_available():
        t = time.perf_counter()
        rec.set("warmup", warmup.warmup())  # neither side should pay ModelOpt's JIT compile
        rec.step("setup", "warmup (compile ModelOpt CUDA extensions)", time.perf_counter() - t)
    t = time.perf_counter()
    model_dir = make_model(args.shape, args.work / "base", args.tokenizer)
    rec.step("setup", "make random-weight model", time.perf_counter() - t,
             bytes=sum(f.stat().st_size for f in model_dir.glob("*.safetensors")))
    base_inodes = inodes(model_dir)

    if torch.cuda.is_available():  # first-use costs (CUDA/cuBLAS init, ModelOpt's module registration) paid here
        t = time.perf_counter()
        prime_dir = make_model("tiny", args.work / "prime", args.tokenizer)
        bare_modelopt(Record(args.work / "prime.json"), "fp8", prime_dir, calibration_tokens(8, 64, 49152), 4,
                      args.work / "prime-out")
        rec.step("setup", "prime (a tiny quantize, not counted)", time.perf_counter() - t)
    spec = ModelSpec(source="hf_dir", path=str(model_dir), name=f"shaped-{args.shape}")
    t = time.perf_counter()
    model = import_model.import_model(spec, args.work)
    rec.step("pipeline", "import (first: hashes the source once)", time.perf_counter() - t)

    for fmt in args.formats:
        samples = args.samples or DEFAULT_SAMPLES.get(fmt, 512)
        tokens = calibration_tokens(samples, args.seq_len, SHAPES[args.shape]["vocab_size"])
        calib_file = write_calibration(tokens, args.work / f"calibration-{samples}x{args.seq_len}.parquet")
        bare_dir = args.work / f"bare-{fmt}"
        bares, pipes = [], []
        for i in range(args.repeat):
            shutil.rmtree(bare_dir, ignore_errors=True)
            bares.append(bare_modelopt(rec, fmt, model_dir, tokens, args.batch_size, bare_dir))
            shutil.rmtree(args.work / "home" / "quantized" / fmt, ignore_errors=True)  # no cache hit on a repeat
            q, pipe = pipeline_quantize(rec, fmt, model, calib_file, tokens, args.batch_size, base_inodes)
            pipes.append(pipe)
        bare = min(bares, key=lambda r: r["seconds"])
        pipe = min(pipes, key=lambda r: r["seconds"])
        ratio = pipe["seconds"] / bare["seconds"]
        disk_ratio = pipe["disk_bytes"] / (bare["disk_bytes"] + pipe["state_bytes"])
        rec.data["runs"][fmt] = {"samples": samples, "bare": bare, "pipeline": pipe, "time_ratio": round(ratio, 3),
                                 "all_bare_s": [r["seconds"] for r in bares],
                                 "all_pipeline_s": [r["seconds"] for r in pipes],
                                 "disk_ratio_vs_bare_export_plus_state": round(disk_ratio, 3)}
        rec.flush()
        print(f"{fmt}: pipeline {pipe['seconds']:.1f} s vs bare {bare['seconds']:.1f} s = {ratio:.2f}x; "
              f"disk {pipe['disk_bytes'] / 1e9:.2f} GB vs {bare['disk_bytes'] / 1e9:.2f} GB + state "
              f"{pipe['state_bytes'] / 1e6:.1f} MB = {disk_ratio:.3f}x", flush=True)
        shutil.rmtree(bare_dir, ignore_errors=True)

        if args.trust_extras and fmt == args.formats[0]:
            target = ReferenceTarget(name="gpu")
            device = machine.local_device()
            t = time.perf_counter()
            prof = build.build(model_slug=spec.slug, checkpoint_dir=q.fakequant_dir, checkpoint_fp=q.fingerprint,
                               fmt=fmt, quant_algo=q.quant_algo, target=target, device=device)
            rec.step("pipeline", f"build {fmt} reference profile (load + restore + forward)", time.perf_counter() - t)
            t0 = time.perf_counter()
            m2 = import_model.import_model(spec, args.work)
            t1 = time.perf_counter()
            q2 = quantize.quantize(
                model_dir=m2.path, model_fp=m2.fingerprint, calibration_file=str(calib_file),
                calib_digest=f"random-{len(tokens)}x{tokens.shape[1]}", fmt=fmt, max_tokens=tokens.shape[1],
                batch_size=args.batch_size)
            t2 = time.perf_counter()
            p2 = build.build(model_slug=spec.slug, checkpoint_dir=q2.fakequant_dir, checkpoint_fp=q2.fingerprint,
                             fmt=fmt, quant_algo=q2.quant_algo, target=target, device=device)
            t3 = time.perf_counter()
            rec.step("rerun", "import + quantize + build", t3 - t0, import_s=round(t1 - t0, 2),
                     quantize_s=round(t2 - t1, 2), build_s=round(t3 - t2, 2),
                     cached=[m2.cached, q2.cached, p2.cached])
            profile_bytes = sum(f.stat().st_size for f in Path(prof.path).rglob("*") if f.is_file())
            t = time.perf_counter()
            problems = store.verify(Path(prof.path), full=True)
            rec.step("issue-10", "full digest verification of the profile", time.perf_counter() - t,
                     bytes=profile_bytes, problems=problems)
            t = time.perf_counter()
            problems = store.verify(Path(prof.path), full=False)
            rec.step("issue-10", "verification on reuse (sizes + identity)", time.perf_counter() - t, problems=problems)
            upload(rec, Path(prof.path), args.work, profile_bytes)
            shutil.rmtree(Path(prof.path), ignore_errors=True)
    print(json.dumps(rec.data["runs"], indent=1))


def upload(rec: Record, profile: Path, work: Path, nbytes: int) -> None:
    """The profile into a local MLflow artifact store (what promotion uploads), or a plain copy without MLflow."""
    target = work / "mlartifacts"
    shutil.rmtree(target, ignore_errors=True)
    try:  # set-up (import, database) outside the timing: only the transfer is timed
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
        exp = mlflow.create_experiment(f"upload-bench-{time.time_ns()}", artifact_location=target.as_uri())
        run = mlflow.start_run(experiment_id=exp)
    except Exception as exc:  # noqa: BLE001 - no MLflow on the host: time the copy it would make
        mlflow, run, why = None, None, f"{type(exc).__name__}: {exc}"
    t = time.perf_counter()
    if mlflow is not None:
        mlflow.log_artifacts(str(profile), artifact_path="profile")
        how = "mlflow.log_artifacts into a local artifact store (file://)"
    else:
        shutil.copytree(profile, target / "profile")
        how = f"plain copy (no MLflow: {why})"
    os.sync()
    seconds = time.perf_counter() - t
    rec.step("issue-10", "upload profile", seconds, how=how, bytes=nbytes, gb_per_s=round(nbytes / 1e9 / seconds, 2))
    if run is not None:
        mlflow.end_run()
    shutil.rmtree(target, ignore_errors=True)


if __name__ == "__main__":
    main()
