"""A fake `trtllm-serve MODEL` for the trtllm backend's contract tests. It is never the real server.

It accepts the documented options only (`commands/serve.py`; reference section 3.4), checks the files it is
pointed at (an HF checkpoint or an engine directory, the extra_llm_api_options YAML against the LlmArgs names),
records its command line and TLLM_AUTOTUNER_CACHE_PATH to FAKE_TRTLLM_LOG, and serves `GET /health` (200, no body)
and `GET /v1/models` on --host/--port until SIGTERM.

FAKE_TRTLLM_SERVE_MODE: "ok" (default); "crash" (exits 3 before listening, as a failed load does); "unhealthy"
(/health answers 503 forever); "stubborn" (ignores SIGTERM, so only SIGKILL stops it).
FAKE_TRTLLM_SERVE_DELAY: seconds to wait before listening (model load).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the fake tensorrt_llm, for the documented names

import yaml  # noqa: E402

import tensorrt_llm  # noqa: E402  (the fake)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trtllm-serve")
    p.add_argument("model")
    p.add_argument("--tokenizer")
    p.add_argument("--host", default="localhost")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["pytorch", "tensorrt", "trt", "_autodeploy"], default="pytorch")
    for flag in ("--max_batch_size", "--max_num_tokens", "--max_seq_len", "--max_beam_width", "--tp_size",
                 "--pp_size", "--ep_size"):
        p.add_argument(flag, type=int)
    p.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=0.9)
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--config", "--extra_llm_api_options", dest="extra_llm_api_options")
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    model = Path(args.model)
    if not (model / "config.json").is_file():
        sys.exit(f"error: {model} has no config.json")
    is_engine = "build_config" in json.loads((model / "config.json").read_text())
    if args.backend in ("tensorrt", "trt"):
        if not is_engine:
            sys.exit(f"error: --backend tensorrt needs an engine directory, got {model}")
        if not args.tokenizer:
            sys.exit("error: an engine directory needs --tokenizer")
    elif is_engine:
        sys.exit(f"error: --backend {args.backend} cannot load the TensorRT engine directory {model}")
    if args.extra_llm_api_options:
        options = yaml.safe_load(Path(args.extra_llm_api_options).read_text())
        allowed = tensorrt_llm.TORCH_LLM_ARGS if args.backend == "pytorch" else \
            tensorrt_llm.BASE_LLM_ARGS | tensorrt_llm.TRT_ONLY_ARGS
        kwargs = {k: tensorrt_llm.CONFIG_TYPES[k](**v) if k in tensorrt_llm.CONFIG_TYPES else v
                  for k, v in options.items()}
        tensorrt_llm.check_llm_args(kwargs, allowed)


def main() -> None:
    args = parse(sys.argv[1:])
    mode = os.environ.get("FAKE_TRTLLM_SERVE_MODE", "ok")
    cache = os.environ.get("TLLM_AUTOTUNER_CACHE_PATH")
    tensorrt_llm.record("trtllm-serve", argv=sys.argv[1:], autotuner_cache_path=cache,
                        autotuner_cache=json.loads(Path(cache).read_text()) if cache and Path(cache).is_file()
                        else None)
    print(f"fake trtllm-serve {tensorrt_llm.__version__}: loading {args.model}", flush=True)
    check(args)
    if mode == "crash":
        print("RuntimeError: fake load failure: CUDA out of memory", flush=True)
        sys.exit(3)
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(float(os.environ.get("FAKE_TRTLLM_SERVE_DELAY", "0")))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/health":
                self.send_response(503 if mode == "unhealthy" else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/v1/models":
                body = json.dumps({"object": "list", "data": [{"id": args.model, "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, fmt, *a):
            print("INFO: " + fmt % a, flush=True)

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"INFO: Uvicorn running on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        print("fake trtllm-serve: shutting down", flush=True)


if __name__ == "__main__":
    main()
