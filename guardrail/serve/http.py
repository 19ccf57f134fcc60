"""An OpenAI-compatible HTTP front over the Guard: `guardrail serve`.

`POST /v1/chat/completions` (plain, or streamed as server-sent events) and `GET /v1/models`,
so clients that already speak OpenAI's API (the `openai` package, curl, other SDKs) call the
guard unchanged; each response carries the guard's decision record as an extra `guard`
field. `tools`/`tool_choice` work as OpenAI's do (`tool_calls`, finish reason "tool_calls",
streamed call deltas), through the same guarded path as every front end
(`guardrail.serve.tool_calls`): a refused conversation gets the refusal text and no call.
The tenant comes from the API key alone: keys are stored as SHA-256 hashes, a missing or
unknown key is a 401, and no request field can name another tenant. Errors use OpenAI's
error body, `{"error": {"message", "type", "param", "code"}}`. Keys never reach the logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guardrail.decision import Answer
from guardrail.errors import GuardrailError, InputError, OverloadedError, ShutdownError
from guardrail.serve.guard import Guard
from guardrail.serve.metrics import Metrics
from guardrail.serve.tool_calls import ToolAnswer, answer_with_tools
from guardrail.serve.tracing import Tracing
from guardrail.tenants.store import UnknownTenantError
from guardrail.tools import Call, assistant_turn, tool_turn

log = logging.getLogger(__name__)

API_KEYS_ENV = "GUARDRAIL_API_KEYS"
MAX_BODY_BYTES = 1_000_000


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """Tenant by API key, from SHA-256 hashes only (the keys themselves are never kept).

    A keys file is YAML: `{tenant: [sha256 hex, ...]}` (`guardrail key new TENANT` prints a
    key and its line). `GUARDRAIL_API_KEYS="tenant=key,other=key2"` gives plain keys in the
    environment instead; they are hashed at start.
    """

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._tenants = dict(hashes)  # hash -> tenant

    @classmethod
    def from_file(cls, path: str | Path) -> ApiKeys:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"{path}: cannot read the API keys: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of tenant to a list of key hashes")
        hashes: dict[str, str] = {}
        for tenant, listed in data.items():
            if not isinstance(listed, list) or not listed:
                raise InputError(f"{path}: tenant {tenant!r}: expected a list of key hashes")
            for digest in listed:
                if not (isinstance(digest, str) and len(digest) == 64):
                    raise InputError(f"{path}: tenant {tenant!r}: not a SHA-256 hex digest")
                hashes[digest.lower()] = str(tenant)
        return cls(hashes)

    @classmethod
    def from_env(cls, value: str | None = None) -> ApiKeys:
        value = os.environ.get(API_KEYS_ENV, "") if value is None else value
        hashes = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            tenant, sep, key = item.partition("=")
            if not sep or not tenant or not key:
                raise InputError(f"{API_KEYS_ENV}: expected tenant=key pairs, got {tenant!r}...")
            hashes[hash_key(key)] = tenant
        return cls(hashes)

    def tenant(self, key: str) -> str | None:
        digest = hash_key(key)
        for known, tenant in self._tenants.items():  # constant time per comparison
            if hmac.compare_digest(known, digest):
                return tenant
        return None

    def __len__(self) -> int:
        return len(self._tenants)

    @property
    def tenants(self) -> set[str]:
        return set(self._tenants.values())


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: Function


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for block in self.content:
            if block.get("type") != "text":
                raise InputError(f"content parts of type {block.get('type')!r}: text only")
            parts.append(str(block.get("text", "")))
        return "".join(parts)


class ChatRequest(BaseModel):
    """The OpenAI fields this server honours; others are ignored, `tenant` is refused."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None

    def tool_list(self) -> list[dict[str, Any]]:
        return [t.model_dump(exclude_none=True) for t in self.tools or []]


def error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return JSONResponse(body, status_code=status)


def create_app(
    guard: Guard, keys: ApiKeys, *, model_id: str, tracing: Tracing | None = None
) -> FastAPI:
    """The HTTP app over a running Guard (its worker is shared by every request);
    `tracing` (off by default) records an OpenTelemetry span per answered request."""
    app = FastAPI(title="guardrail", docs_url=None, redoc_url=None)
    metrics = Metrics(guard.worker, tracing)

    def fail(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
        metrics.failed(status)
        return error(status, message, kind, code)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return fail(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error")

    def tenant_of(request: Request) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        return keys.tenant(key.strip()) if scheme.lower() == "bearer" and key else None

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = getattr(guard.worker, "accepting", True)  # False once closing
        return JSONResponse({"ready": bool(ready)}, status_code=200 if ready else 503)

    @app.get("/v1/models", response_model=None)
    async def models(request: Request) -> Any:
        if tenant_of(request) is None:
            return fail(
                401, "missing or invalid API key", "invalid_request_error", "invalid_api_key"
            )
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "guardrail"}],
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> Any:
        started = time.monotonic()
        tenant = tenant_of(request)
        if tenant is None:
            return fail(
                401, "missing or invalid API key", "invalid_request_error", "invalid_api_key"
            )
        size = int(request.headers.get("content-length") or 0)
        body = await request.body() if size <= MAX_BODY_BYTES else b""
        if size > MAX_BODY_BYTES or len(body) > MAX_BODY_BYTES:
            return fail(413, f"the body exceeds {MAX_BODY_BYTES} bytes", "invalid_request_error")
        try:
            payload = ChatRequest.model_validate_json(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return fail(400, f"{where}: {first['msg']}", "invalid_request_error")
        if "tenant" in (payload.model_extra or {}):
            return fail(400, "the tenant comes from the API key", "invalid_request_error")
        if payload.model != model_id:
            return fail(
                404,
                f"model {payload.model!r} is not served here",
                "invalid_request_error",
                "model_not_found",
            )
        if payload.n != 1:
            return fail(400, "n must be 1", "invalid_request_error")
        try:
            messages = [_turn(m) for m in payload.messages]
            options = _options(payload)
            if payload.tools and payload.tool_choice != "none":
                tooled = await _answer_with_tools(guard, tenant, messages, payload, options)
                metrics.answered(tooled.decision, time.monotonic() - started)
                if payload.stream:
                    return StreamingResponse(
                        _sse_tools(tooled, model_id, options.get("max_new_tokens")),
                        media_type="text/event-stream",
                    )
                return _completion(tooled, model_id, options.get("max_new_tokens"))
            if payload.stream:
                stream = guard.stream(messages, tenant=tenant, **options)
                return StreamingResponse(
                    _sse(stream, model_id, options.get("max_new_tokens"), metrics, started),
                    media_type="text/event-stream",
                )
            answer = await guard.generate(messages, tenant=tenant, **options)
        except (InputError, UnknownTenantError) as exc:
            return fail(400, str(exc), "invalid_request_error")
        except OverloadedError as exc:
            return fail(429, str(exc), "rate_limit_error")
        except ShutdownError as exc:
            return fail(503, str(exc), "server_error")
        except GuardrailError as exc:
            log.exception("request of tenant %s failed", tenant)
            return fail(500, str(exc), "server_error")
        metrics.answered(answer.decision, time.monotonic() - started)
        return _completion(
            ToolAnswer(answer.text, [], [answer]), model_id, options.get("max_new_tokens")
        )

    return app


def _turn(message: Message) -> dict[str, str]:
    """One OpenAI message as a role/content turn, calls and results in the tool prompt format."""
    if message.role == "tool":
        return tool_turn(message.text())
    if message.role == "assistant" and message.tool_calls:
        calls = []
        for call in message.tool_calls:
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except json.JSONDecodeError as exc:
                raise InputError(f"tool call {call.id!r}: arguments are not JSON: {exc}") from exc
            if not isinstance(arguments, dict):
                raise InputError(f"tool call {call.id!r}: arguments must be a JSON object")
            calls.append(Call(call.function.name, arguments, call.id))
        return assistant_turn(message.text(), calls)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": message.text()}


async def _answer_with_tools(
    guard: Guard,
    tenant: str,
    chat: list[dict[str, str]],
    payload: ChatRequest,
    options: dict[str, Any],
) -> ToolAnswer:
    async def ask(turns: list[dict[str, str]], step: dict[str, Any]) -> Answer:
        return await guard.generate(turns, tenant=tenant, **step)

    return await answer_with_tools(
        ask, chat, payload.tool_list(), payload.tool_choice, options=options
    )


def _options(payload: ChatRequest) -> dict[str, Any]:
    options: dict[str, Any] = {}
    tokens = payload.max_completion_tokens or payload.max_tokens
    if tokens is not None:
        options["max_new_tokens"] = tokens
    for name in ("temperature", "top_p", "seed"):
        if (value := getattr(payload, name)) is not None:
            options[name] = value
    if payload.stop:
        options["stop"] = [payload.stop] if isinstance(payload.stop, str) else payload.stop
    return options


def _finish_reason(answer: ToolAnswer, max_new_tokens: int | None) -> str:
    if answer.refused:
        return "content_filter"
    if answer.calls:
        return "tool_calls"
    if max_new_tokens is not None and answer.decision.new_tokens >= max_new_tokens:
        return "length"
    return "stop"


def _usage(answer: ToolAnswer) -> dict[str, int]:
    prompt, completion = answer.prompt_tokens, answer.new_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _call(call: Call) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json()},
    }


def _completion(answer: ToolAnswer, model_id: str, max_new_tokens: int | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
    if answer.calls:
        message["tool_calls"] = [_call(c) for c in answer.calls]
    elif message["content"] is None:
        message["content"] = ""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_id,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _finish_reason(answer, max_new_tokens),
            }
        ],
        "usage": _usage(answer),
        "guard": answer.decision.as_dict(),
    }


def _chunk_base(model_id: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model_id,
    }


def _event(base: dict[str, Any], delta: dict[str, Any], finish: str | None, **extra: Any) -> str:
    body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
    return f"data: {json.dumps(body)}\n\n"


# Streamed call arguments come in pieces of this many characters, as OpenAI's do.
_ARGUMENT_PIECE = 16


async def _sse_tools(
    answer: ToolAnswer, model_id: str, max_new_tokens: int | None
) -> AsyncIterator[str]:
    """An answer with tools as OpenAI streams one: its text, then per call a delta with its
    index, id, type and name, then its arguments in pieces; the last event has the finish
    reason, usage and the decision. The whole answer is made first: a call is parsed (and
    guarded) before any of it is shown."""
    base = _chunk_base(model_id)
    yield _event(base, {"role": "assistant", "content": answer.text or None}, None)
    for index, call in enumerate(answer.calls):
        opening = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        yield _event(base, {"tool_calls": [opening]}, None)
        arguments = call.arguments_json()
        for start in range(0, len(arguments), _ARGUMENT_PIECE):
            piece = arguments[start : start + _ARGUMENT_PIECE]
            delta = {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
            yield _event(base, delta, None)
    extra = {"usage": _usage(answer), "guard": answer.decision.as_dict()}
    yield _event(base, {}, _finish_reason(answer, max_new_tokens), **extra)
    yield "data: [DONE]\n\n"


async def _sse(
    stream: Any, model_id: str, max_new_tokens: int | None, metrics: Metrics, started: float
) -> AsyncIterator[str]:
    """OpenAI's chunk events; the last carries the finish reason, usage and the decision. A
    client that goes away cancels the request (the stream is closed with the response)."""
    base = _chunk_base(model_id)

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return _event(base, delta, finish, **extra)

    try:
        yield event({"role": "assistant", "content": ""})
        async for text in stream:
            yield event({"content": text})
        answer = ToolAnswer("", [], [stream.result])
        metrics.answered(answer.decision, time.monotonic() - started)
        extra = {"usage": _usage(answer), "guard": answer.decision.as_dict()}
        yield event({}, _finish_reason(answer, max_new_tokens), **extra)
    except GuardrailError as exc:  # after the headers went out: an error event ends it
        kind = "invalid_request_error" if isinstance(exc, InputError) else "server_error"
        body = {"error": {"message": str(exc), "type": kind, "param": None, "code": None}}
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


__all__ = ["API_KEYS_ENV", "ApiKeys", "ChatRequest", "create_app", "hash_key"]
