"""An OpenAI-compatible server: POST /v1/chat/completions (streaming with SSE), GET /v1/models, GET /health,
GET /metrics, and a chat page at / (static files, a client of /v1/chat/completions).

Safe by default: media may only come inline (data URIs) unless the operator allows remote URLs (public addresses
only, checked on every redirect) or a local directory. Requests are capped in size, images, pixels, video frames
and tokens; every bad request gets an OpenAI-style error and no other request is affected.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..cpu.threads import single_threaded
from ..errors import ConstraintError, InputError, Qwen2VLError
from ..generate import TextDelta, Usage
from ..grammar import Constraint
from ..inputs.fetch import MediaPolicy
from .metrics import Metrics
from .scheduler import EngineThread, Job
from .schema import ChatCompletionRequest
from .settings import Limits, ServerSettings


REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
STATIC = Path(__file__).with_name("static")  # the chat page: HTML, CSS, JS and its two vendored libraries


def build_app(settings: ServerSettings, replica: str | None = None, progress: bool = True):
    """Load the model with the settings' engine, and the app serving it with their limits and media policy."""
    from ..api import Qwen2VL

    model = Qwen2VL.from_pretrained(settings.model, dtype=settings.dtype, device=settings.device,
                                    fast=False if settings.exact else None, progress=progress,
                                    engine=settings.engine)
    return create_app(model, model_name=settings.model_name, policy=settings.media.policy(
        settings.limits.max_body_bytes), limits=settings.limits, replica=replica)


def page_config(values: dict) -> str:
    """The page's settings as a JSON script element (the server's limits, shown and checked before sending)."""
    data = json.dumps(values).replace("</", "<\\/")  # never closes the script element
    return f'<script id="config" type="application/json">{data}</script>'


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": None}})


def create_app(model, *, model_name: str, policy: MediaPolicy | None = None, limits: Limits | None = None,
               replica: str | None = None) -> FastAPI:
    """`model` is a loaded qwen2vl.Qwen2VL. The app runs one thread that steps the model's engine. Every response
    names the process that answered (`replica`: default host and pid) in an X-Qwen2VL-Replica header."""
    policy = policy or MediaPolicy.deny_all_but_data()
    limits = limits or Limits()
    processor = model.processor.with_policy(policy)  # this app's media policy, not the model's
    engine = model.engine
    metrics = Metrics(engine)
    engine.watch(metrics)
    runner = EngineThread(engine)

    def prepare(conversation, options):
        single_threaded()  # a request thread: no OpenMP pool besides the engine's (cpu/threads.py)
        return processor(conversation, **options)

    app = FastAPI(title="qwen2vl", version="0.1.0", on_shutdown=[runner.stop])
    app.state.engine = engine
    app.state.stop = runner.stop  # for users of the app outside a server (batch jobs): ends the engine's thread
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.add_middleware(ReplicaHeader, name=replica or f"{socket.gethostname()}-{os.getpid()}")

    page = (STATIC / "index.html").read_text().replace("<!--CONFIG-->", page_config({
        "model": model_name, "max_images": limits.max_images, "max_videos": limits.max_videos,
        "max_body_bytes": limits.max_body_bytes, "max_pixels": limits.max_pixels}))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return page

    @app.get("/metrics")
    async def prometheus():
        return metrics.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{first.get('msg', 'invalid request')}" + (f" (at {where})" if where else "")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return error(400, message, param=where or None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "qwen2vl"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            conversation, options = to_conversation(body, limits)
            params = model.sampling(**sampling_args(body, limits))
            constraint = output_constraint(body)
            inputs = await run_in_threadpool(prepare, conversation, options)  # decoding off the event loop
            grammar = await run_in_threadpool(model.compile, constraint)
        except InputError as e:
            return error(400, str(e), param="response_format" if isinstance(e, ConstraintError) else None)
        except (ValueError, TypeError) as e:
            return error(400, str(e))
        job = Job(asyncio.get_running_loop())
        [(job.seq, _)] = model.submit(inputs, params, grammar, sink=job.send)
        given = request.headers.get("x-request-id", "")  # a caller's id (batch jobs: the same on every run)
        rid = f"chatcmpl-{given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex}"
        created = int(time.time())
        if not body.stream:  # (a stream's generator is closed when its client leaves: it cancels in `finally`)
            asyncio.get_running_loop().create_task(watch_disconnect(request, job))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(job, rid, created, model_name, include_usage, model.config),
                                     media_type="text/event-stream")
        deltas: list[TextDelta] = []
        while (item := await job.events.get()) is not None:
            if isinstance(item, Exception):
                return error(500, f"generation failed: {item}", "server_error")
            deltas.append(item)
        r = model.result(job.seq, deltas)
        message = {"role": "assistant", "content": r.text}
        if r.boxes:  # an extension field; OpenAI clients ignore it (the openai package exposes it as model_extra)
            message["boxes"] = [{"label": b.label, "x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2, "image": b.image}
                                for b in r.boxes]
        choice = {"index": 0, "message": message, "finish_reason": r.finish_reason,
                  "logprobs": logprobs_block(deltas, processor.tokenizer) if body.logprobs else None}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [choice], "usage": usage_block(r.usage)}

    return app


async def watch_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when its client goes away (the engine then drops its row at the next step). Waits for the
    server's disconnect message instead of polling: wake-ups on a 2-core machine stall the decode's threads."""
    while not job.finished:
        if (await request.receive())["type"] == "http.disconnect":
            job.cancel()  # a no-op once the answer is done
            return


async def sse(job: Job, rid: str, created: int, model_name: str, include_usage: bool, config):
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (item := await job.events.get()) is not None:
            if isinstance(item, Exception):
                yield f"data: {json.dumps({'error': {'message': str(item), 'type': 'server_error'}})}\n\n"
                return
            if item.text or item.finish_reason:
                yield chunk({"content": item.text} if item.text else {}, item.finish_reason)
        if include_usage:
            u = job.seq.usage(config.image_token_id, config.video_token_id)
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [], "usage": usage_block(u)}
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a client that left stops its generation at the next step (a no-op once it is done)


def to_conversation(body: ChatCompletionRequest, limits: Limits) -> tuple[list[dict], dict[str, Any]]:
    """OpenAI messages -> the qwen-vl-utils format, with the server's caps applied."""
    conversation, images, videos = [], 0, 0
    for i, m in enumerate(body.messages):
        if m.content is None or isinstance(m.content, str):
            conversation.append({"role": m.role, "content": m.content or ""})
            continue
        parts = []
        for j, p in enumerate(m.content):
            extra = {k: v for k, v in (p.model_extra or {}).items()}
            if p.type == "text":
                parts.append({"type": "text", "text": p.text or ""})
            elif p.type in ("image_url", "image"):
                url = p.image_url.url if hasattr(p.image_url, "url") else (p.image_url or p.image)
                if not url:
                    raise InputError(f"message {i}, part {j}: an image part needs a url")
                images += 1
                parts.append({"type": "image", "image": url, **_capped_image(extra, limits)})
            else:
                url = p.video_url.url if hasattr(p.video_url, "url") else (p.video_url or p.video)
                if not url:
                    raise InputError(f"message {i}, part {j}: a video part needs a url")
                videos += 1
                parts.append({"type": "video", "video": url, **_capped_video(extra, limits)})
        conversation.append({"role": m.role, "content": parts})
    if images > limits.max_images:
        raise InputError(f"{images} images in one request; this server accepts at most {limits.max_images}")
    if videos > limits.max_videos:
        raise InputError(f"{videos} videos in one request; this server accepts at most {limits.max_videos}")
    options = {k: v for k, v in (("min_pixels", body.min_pixels), ("max_pixels", body.max_pixels)) if v is not None}
    if "max_pixels" in options:
        options["max_pixels"] = min(options["max_pixels"], limits.max_pixels)
    else:
        options["max_pixels"] = limits.max_pixels
    return conversation, options


def _capped_image(extra: dict, limits: Limits) -> dict:
    out = {k: int(extra[k]) for k in ("min_pixels", "max_pixels") if k in extra}
    out["max_pixels"] = min(out.get("max_pixels", limits.max_pixels), limits.max_pixels)
    return out


def _capped_video(extra: dict, limits: Limits) -> dict:
    out = {k: extra[k] for k in ("fps", "nframes", "min_pixels", "max_pixels", "video_start", "video_end")
           if k in extra}
    if int(out.get("nframes", 0)) > limits.max_video_frames:
        raise InputError(f"nframes {out['nframes']} exceeds this server's limit of {limits.max_video_frames}")
    out["max_frames"] = limits.max_video_frames
    return out


def sampling_args(body: ChatCompletionRequest, limits: Limits) -> dict[str, Any]:
    max_tokens = body.max_completion_tokens or body.max_tokens or min(512, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise InputError(f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}")
    if body.min_tokens is not None and body.min_tokens > max_tokens:
        raise InputError(f"min_tokens {body.min_tokens} exceeds max_tokens {max_tokens}")
    args = {"max_new_tokens": max_tokens, "min_new_tokens": body.min_tokens, "temperature": body.temperature,
            "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p, "presence_penalty": body.presence_penalty,
            "seed": body.seed,
            "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
            "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
            "logprobs": body.logprobs or None, "top_logprobs": body.top_logprobs}
    return {k: v for k, v in args.items() if v is not None}


def output_constraint(body: ChatCompletionRequest) -> Constraint | None:
    f = body.response_format
    if f is None or f.type == "text":
        return None
    if f.type == "json_object":
        return Constraint(json_object=True)
    if f.json_schema is None or f.json_schema.schema_ is None:
        raise InputError("response_format json_schema needs json_schema.schema")
    return Constraint(json_schema=f.json_schema.schema_)


def usage_block(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
            "image_tokens": u.image_tokens, "video_tokens": u.video_tokens}


def logprobs_block(deltas: list[TextDelta], tokenizer) -> dict:
    def entry(token: int, lp: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(d.token, d.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in (d.top_logprobs or [])]} for d in deltas]}


class ReplicaHeader:
    """Adds X-Qwen2VL-Replica: which copy of the server answered (several run behind Ray Serve's proxy)."""

    def __init__(self, app, name: str):
        self.app, self.header = app, (b"x-qwen2vl-replica", name.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, named)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over `limit` bytes with a 413, whether or not Content-Length is sent."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": {"message": f"request body over {self.limit} bytes", "type":
                                     "invalid_request_error", "param": None, "code": None}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


__all__ = ["create_app", "Limits", "Qwen2VLError"]
