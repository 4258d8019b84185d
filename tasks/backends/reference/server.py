"""An OpenAI-compatible completions endpoint over a reference profile, for the latency benchmark.

    python -m tasks.backends.reference.server --profile DIR --port 8001

Routes: GET /health, GET /v1/models, POST /v1/completions (prompt as text or token ids; `stream`, `max_tokens`,
`min_tokens`/`ignore_eos`, `stream_options.include_usage`). One request generates at a time: the reference runtime
has no batching, so under concurrency the queueing shows up in TTFT, as it would on any server without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def create_app(profile_dir: Path) -> Starlette:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from tasks.backends.reference.backend import load_model

    model, tokenizer = load_model(profile_dir)
    device = next(model.parameters()).device
    model_name = Path(profile_dir).name
    lock = threading.Lock()  # one generation at a time

    class QueueStreamer(BaseStreamer):
        """Pushes each generated token id into an asyncio queue, from the generating thread."""

        def __init__(self, loop, queue):
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value):
            if not self.prompt_seen:  # generate() first passes the prompt
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def generate(ids: list[int], max_tokens: int, min_tokens: int, streamer) -> None:
        input_ids = torch.tensor([ids], device=device)
        with lock, torch.no_grad():
            model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                           min_new_tokens=min_tokens, do_sample=False, streamer=streamer,
                           pad_token_id=tokenizer.pad_token_id)

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def models(_: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model"}]})

    async def completions(request: Request) -> Response:
        try:
            body = await request.json()
            prompt = body["prompt"]
            max_tokens = int(body.get("max_tokens", 16))
        except (ValueError, KeyError, TypeError) as exc:
            return JSONResponse({"error": {"message": f"bad request: {exc}"}}, status_code=400)
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt, add_special_tokens=False)["input_ids"]
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens", 0))
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        rid, created = f"cmpl-{uuid.uuid4().hex[:12]}", int(time.time())
        worker = loop.run_in_executor(None, generate, ids, max_tokens, min_tokens, QueueStreamer(loop, queue))

        async def tokens():
            while (token := await queue.get()) is not None:
                yield token
            await worker

        def chunk(text: str, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": rid, "object": "text_completion", "created": created,
                                          "model": model_name, "choices": [{"index": 0, "text": text,
                                                                            "finish_reason": finish}]}) + "\n\n"

        if not body.get("stream"):
            out = [t async for t in tokens()]
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                 "choices": [{"index": 0, "text": tokenizer.decode(out), "finish_reason": "length"}],
                                 "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out)}})

        async def stream():
            n = 0
            async for token in tokens():
                n += 1
                yield chunk(tokenizer.decode([token]))
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"id": rid, "object": "text_completion", "choices": [],
                                             "usage": {"prompt_tokens": len(ids), "completion_tokens": n}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/completions", completions, methods=["POST"])])


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(create_app(args.profile), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
