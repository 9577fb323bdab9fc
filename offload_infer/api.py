"""The OpenAI-compatible HTTP API (FastAPI) over an ``EngineLoop``: models, chat and text completions
(whole or streamed as Server-Sent Events), health and Prometheus metrics.

Each request gets an asyncio queue that the engine thread feeds (``loop.call_soon_threadsafe``); text is
detokenized here, never split inside a UTF-8 character, and held back while it could still be the start
of a stop string. A client that disconnects cancels its request, which frees its KV at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from offload_infer.detok import TextStream
from offload_infer.openai_schemas import (ChatCompletionRequest, CompletionRequest, error_body, new_id, now,
                                          usage)
from offload_infer.sampling import SamplingParams
from offload_infer.serving import EngineLoop, Event, QueueFullError

if TYPE_CHECKING:
    from weights.tokenizer import Tokenizer

MAX_BODY = 4 << 20  # bytes


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param, code)


def create_app(loop: EngineLoop, tokenizer: Tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 256) -> FastAPI:
    app = FastAPI(title="offload-infer", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:])}: {err.get('msg')}" for err in e.errors())
        return JSONResponse(error_body(msg or "invalid request", param=where), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            return JSONResponse(error_body(f"request body larger than {MAX_BODY} bytes"), status_code=413)
        if api_key is not None and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(error_body("invalid or missing API key", "authentication_error",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if loop.failed:
            return JSONResponse({"status": "error", "error": loop.failed}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": now(),
                                            "owned_by": "offload-infer"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        m = loop.metrics
        per_pass = m.tokens_total / m.passes_total if m.passes_total else 0.0
        rate = m.tokens_total / m.step_seconds_total if m.step_seconds_total else 0.0
        lines = [
            ("offload_infer_requests_total", "counter", "requests admitted", m.requests_total),
            ("offload_infer_generated_tokens_total", "counter", "tokens generated", m.tokens_total),
            ("offload_infer_llm_passes_total", "counter", "LLM passes (engine steps)", m.passes_total),
            ("offload_infer_tokens_per_llm_pass", "gauge", "tokens generated per LLM pass, all requests", per_pass),
            ("offload_infer_tokens_per_second", "gauge", "tokens generated per second of engine steps", rate),
            ("offload_infer_running_requests", "gauge", "requests in the batch", m.running),
            ("offload_infer_queue_depth", "gauge", "requests waiting for the batch", m.waiting),
            ("offload_infer_in_flight_requests", "gauge", "requests accepted and not finished", loop.in_flight),
        ]
        text = "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def params_of(body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> SamplingParams:
        try:
            return SamplingParams(max_new_tokens=max_tokens or default_max_tokens, temperature=body.temperature,
                                  top_k=body.top_k, top_p=body.top_p, seed=body.seed, stop=tuple(body.stop or ()),
                                  ignore_eos=body.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def submit(ids: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        q: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        try:
            handle = loop.submit(ids, params, lambda ev: aio.call_soon_threadsafe(q.put_nowait, ev))
        except QueueFullError as e:
            raise APIError(503, str(e), "server_busy") from None
        except ValueError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded"
                           if "length" in str(e) or "KV" in str(e) else None) from None
        except RuntimeError as e:
            raise APIError(503, str(e), "server_error") from None
        return handle, q

    async def run(request: Request, body, ids: list[int], params: SamplingParams, chat: bool):
        handle, q = submit(ids, params)
        rid = new_id("chatcmpl" if chat else "cmpl")
        created = now()
        stream = TextStream(tokenizer, params.stop)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request, handle, q, stream, rid, created, chat, include_usage, len(ids)),
                                     media_type="text/event-stream")
        n_out, text, last = 0, "", None
        try:
            while True:
                ev: Event = await q.get()
                n_out += len(ev.tokens)
                text += stream.push(ev.tokens, ev.finished, ev.stop_text)
                if ev.finished:
                    last = ev
                    break
        finally:
            if last is None:
                loop.cancel(handle)
        if last.error:
            raise APIError(500, last.error, "server_error")
        choice = {"index": 0, "finish_reason": _reason(last.finish_reason)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": [choice], "usage": usage(len(ids), n_out),
                "offload_infer": _spec(last.stats)}

    async def sse(request: Request, handle: int, q: asyncio.Queue, stream: TextStream, rid: str, created: int,
                  chat: bool, include_usage: bool, n_prompt: int) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        n_out, done = 0, False

        def chunk(delta_text: str | None, reason: str | None, first: bool = False, extra: dict | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                          "choices": [choice], **(extra or {})}) + "\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while not done:
                try:
                    ev: Event = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                n_out += len(ev.tokens)
                text = stream.push(ev.tokens, ev.finished, ev.stop_text)
                if ev.error:
                    yield "data: " + json.dumps(error_body(ev.error, "server_error")) + "\n\n"
                    done = True
                    break
                if text and not ev.finished:
                    yield chunk(text, None)
                if ev.finished:
                    done = True
                    yield chunk(text, _reason(ev.finish_reason), extra={"offload_infer": _spec(ev.stats)})
            if include_usage:
                yield ("data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                              "choices": [], "usage": usage(n_prompt, n_out)}) + "\n\n")
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the server is stopping): free the request's KV
                loop.cancel(handle)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        check_model(body.model)
        if not tokenizer.chat_template:
            raise APIError(400, f"{model_name} has no chat template; use /v1/completions", param="messages")
        try:
            ids = tokenizer.encode_messages([m.model_dump() for m in body.messages])
        except Exception as e:  # noqa: BLE001 - a template may raise anything for odd conversations
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        return await run(request, body, ids, params_of(body, body.max_completion_tokens or body.max_tokens), True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        check_model(body.model)
        ids = tokenizer.encode(body.prompt)
        return await run(request, body, ids, params_of(body, body.max_tokens), False)

    return app


def _reason(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}.get(reason or "", reason)


def _spec(stats: dict | None) -> dict:
    """Per-response speculation figures (an extra field beside OpenAI's)."""
    if not stats:
        return {}
    return {"llm_passes": stats["llm_passes"], "tokens_per_pass": stats["tokens_per_pass_mean"],
            "tree_size_mean": stats["tree_size_mean"]}
