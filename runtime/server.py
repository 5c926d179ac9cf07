"""`xrun ARTIFACTS --serve`: an OpenAI-compatible HTTP server (Starlette/FastAPI + uvicorn) over
the continuous-batching engine (runtime/engine.py).

    POST /v1/completions         prompt -> text; "stream": true sends server-sent events
    POST /v1/chat/completions    messages -> the chat template -> text; streams likewise
    GET  /v1/models              the one model served
    GET  /health                 200 while the engine runs, 503 once it has failed

Bad requests get OpenAI's error object ({"error": {"message", "type", "param", "code"}}) with
a 4xx status and the server goes on: 400 for malformed input, 404 for an unknown model, 429
when every KV-cache slot is busy, 503 when the engine has stopped (a rank died); after that the
process exits (code 3) so a supervisor (systemd, Kubernetes) can start it again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from xcompile.errors import UserError
from xcompile.runtime.engine import Busy, Engine, EngineFailed
from xcompile.runtime.sampling import SamplingParams
from xcompile.runtime.stopping import StopChecker
from xcompile.runtime.tokenizer import TextTokenizer


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class Served:
    engine: Engine
    tokenizer: TextTokenizer
    model_name: str
    chat_template: Any = None  # runtime.chat.ChatTemplate, or None: /v1/chat/completions refuses
    created: int = 0


# ---- request fields -------------------------------------------------------------------------
def _field(body: dict, name: str, kinds: tuple, default=None, check=None, why: str = ""):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string") for k in kinds)
        raise ApiError(400, f"'{name}' must be a {names}", param=name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' {why}", param=name)
    return value


def sampling_of(body: dict) -> SamplingParams:
    for unsupported in ("logprobs", "top_logprobs", "best_of", "suffix", "tools", "logit_bias"):
        if body.get(unsupported) not in (None, False, [], {}):
            raise ApiError(
                400, f"'{unsupported}' is not supported by this server", param=unsupported
            )
    if _field(body, "n", (int,), 1) != 1:
        raise ApiError(400, "only n = 1 is supported", param="n")
    return SamplingParams(
        temperature=float(
            _field(
                body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]"
            )
        ),
        top_k=max(0, _field(body, "top_k", (int,), 0, lambda v: v >= -1, "must be >= -1")),
        top_p=float(
            _field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")
        ),
        seed=_field(body, "seed", (int,)),
    )


def stops_of(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if (
        not isinstance(stop, list)
        or not all(isinstance(s, str) and s for s in stop)
        or len(stop) > 16
    ):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 16", param="stop")
    return stop


def max_tokens_of(body: dict, default: int | None) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            return _field(body, name, (int,), None, lambda v: v >= 1, "must be at least 1")
    return default


# ---- generation as an async stream ----------------------------------------------------------
async def generate(
    served: Served, prompt_ids: list[int], body: dict, default_max: int | None
) -> tuple[Any, AsyncIterator[tuple[str, str | None]], dict]:
    """Submit to the engine -> (request, stream of (text, finish_reason), usage dict that
    fills as it runs). Refusals (busy, too long, failed engine) raise ApiError before any
    output, so they can still get a status code."""
    engine = served.engine
    params = sampling_of(body)
    stop = stops_of(body)
    max_tokens = max_tokens_of(body, default_max)
    if len(prompt_ids) >= engine.capacity:
        raise ApiError(
            400,
            f"the prompt is {len(prompt_ids)} tokens; this model's context is "
            f"{engine.capacity} tokens: shorten the prompt",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    budget = engine.capacity - len(prompt_ids)
    if max_tokens is not None and max_tokens > budget:
        max_tokens = budget  # as llama.cpp: the context caps it (finish_reason "length")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(token, reason):  # the engine's thread
        loop.call_soon_threadsafe(queue.put_nowait, (token, reason))

    try:
        checker = StopChecker(served.tokenizer, stop, served.tokenizer.eos_ids)
        request = engine.submit(
            prompt_ids, max_tokens or budget, params, served.tokenizer.eos_ids, emit
        )
    except Busy as e:
        raise ApiError(
            429, f"server busy: {e}; retry later", "rate_limit_error", code="slots_full"
        ) from None
    except EngineFailed as e:
        raise ApiError(503, f"the model is down ({e})", "server_error") from None
    except UserError as e:
        raise ApiError(400, str(e)) from None
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0, "total_tokens": 0}

    async def stream() -> AsyncIterator[tuple[str, str | None]]:
        try:
            while True:
                token, reason = await queue.get()
                if token is not None:
                    usage["completion_tokens"] += 1
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    text, finish = checker.push(token)
                    if finish:
                        yield text, "stop"
                        return
                    if text:
                        yield text, None
                    continue
                if reason == "error":
                    raise ApiError(503, "the model stopped while generating", "server_error")
                yield checker.flush(), "length" if reason == "length" else "stop"
                return
        finally:
            engine.cancel(request)  # finished, stopped by a stop string, or the client left

    return request, stream(), usage


# ---- the app --------------------------------------------------------------------------------
def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="xcompile", docs_url=None, redoc_url=None)
    served.created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(404)
    async def not_found(request: Request, _):
        e = ApiError(404, f"no route {request.method} {request.url.path}", code="not_found")
        return JSONResponse(e.body(), status_code=404)

    @app.exception_handler(405)
    async def not_allowed(request: Request, _):
        e = ApiError(405, f"{request.method} is not allowed on {request.url.path}")
        return JSONResponse(e.body(), status_code=405)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served.model_name:
            raise ApiError(
                404,
                f"the model `{model}` does not exist; this server serves `{served.model_name}`",
                param="model",
                code="model_not_found",
            )
        if served.engine.failed:
            raise ApiError(503, f"the model is down ({served.engine.failed})", "server_error")
        return body

    @app.get("/health")
    async def health():
        if served.engine.failed:
            return JSONResponse({"status": "down", "reason": served.engine.failed}, 503)
        engine = served.engine  # steps: forward passes so far (one per step for the whole batch)
        return {
            "status": "ok",
            "slots": engine.slots,
            "busy": engine.busy_slots,
            "steps": engine.steps,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": served.model_name,
                    "object": "model",
                    "created": served.created,
                    "owned_by": "xcompile",
                    "max_model_len": served.engine.capacity,
                }
            ],
        }

    def prompt_ids_of(body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = served.tokenizer.encode(prompt)
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            vocab = served.tokenizer.tok.get_vocab_size()
            if any(not 0 <= t < vocab for t in prompt):
                raise ApiError(400, f"token ids must be in 0..{vocab - 1}", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(
                400,
                "'prompt' must be a string or a list of token ids (one prompt)",
                param="prompt",
            )
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        return ids

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        ids = prompt_ids_of(body)
        stream_it = _field(body, "stream", (bool,), False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        _, pieces, usage = await generate(served, ids, body, default_max=16)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None) -> dict:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": served.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            }

        if stream_it:
            return StreamingResponse(
                sse(pieces, chunk, usage if include_usage else None), media_type="text/event-stream"
            )
        text, finish = await collect(pieces)
        out = chunk(text, finish)
        out["usage"] = usage
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        if served.chat_template is None:
            raise ApiError(
                400,
                "this model has no chat template; use /v1/completions with a prompt",
                param="messages",
            )
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        try:
            extra = {}
            if isinstance(body.get("chat_template_kwargs"), dict):
                extra = body["chat_template_kwargs"]
            text = served.chat_template.render(messages, add_generation_prompt=True, **extra)
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = served.chat_template.encode(served.tokenizer, text)
        stream_it = _field(body, "stream", (bool,), False)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        _, pieces, usage = await generate(served, ids, body, default_max=None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: str | None, first: bool = False) -> dict:
            delta = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta = {"content": text}
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": served.model_name,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        if stream_it:
            return StreamingResponse(
                sse(pieces, chunk, usage if include_usage else None, first_chunk=True),
                media_type="text/event-stream",
            )
        text, finish = await collect(pieces)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": served.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }

    return app


async def collect(pieces: AsyncIterator[tuple[str, str | None]]) -> tuple[str, str]:
    text, finish = [], "stop"
    async for piece, reason in pieces:
        text.append(piece)
        if reason:
            finish = reason
    return "".join(text), finish


async def sse(pieces, chunk, usage: dict | None, first_chunk: bool = False):
    """Server-sent events as OpenAI sends them: one `data: {json}` per piece, the last one with
    finish_reason, then `data: [DONE]`."""

    def event(obj: dict) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    try:
        if first_chunk:
            yield event(chunk("", None, first=True))
        async for piece, reason in pieces:
            if piece or reason:
                yield event(chunk(piece, reason))
        if usage is not None:
            last = chunk("", None)
            last["choices"], last["usage"] = [], usage
            yield event(last)
        yield b"data: [DONE]\n\n"
    except ApiError as e:  # the engine failed mid-stream: tell the client in the stream
        yield event(e.body())
        yield b"data: [DONE]\n\n"
    finally:  # also when the client went away mid-stream: the request leaves the batch now
        await pieces.aclose()


def serve(served: Served, host: str, port: int, on_ready=None) -> int:
    """Run until interrupted or the engine fails -> exit code (0, or 3 when the model died)."""
    import uvicorn

    app = create_app(served)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)

    async def watch():
        while not server.started:
            await asyncio.sleep(0.05)
        if on_ready:
            on_ready(server)
        while not server.should_exit:
            if served.engine.failed:
                await asyncio.sleep(1.0)  # /health says 503 meanwhile
                server.should_exit = True
                return
            await asyncio.sleep(0.1)

    async def main():
        task = asyncio.create_task(watch())
        await server.serve()
        task.cancel()

    # Not asyncio.run: its own Ctrl-C handling races uvicorn's (which shuts down gracefully,
    # then raises the signal again), and the exit code came out 0 or 130 by chance. Here the
    # re-raised SIGINT always ends as KeyboardInterrupt: exit 130, as everywhere in xrun.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return 3 if served.engine.failed else 0
