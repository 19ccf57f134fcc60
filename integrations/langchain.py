"""LangChain: `GuardedChatModel`, a real `BaseChatModel` over the shared guard.

Agents use it unchanged (`bind_tools`, `with_structured_output`, streaming, async): every
request goes through the same `Guard` as the Python API, so the gate, steering and the
tenant's policy apply, and each message carries the guard's decision record in
`response_metadata["guard"]`. Instances are cheap; those for the same model, policy folder
and Redis share one Guard (and model worker) per process, loaded on first use.

Tool calls use a documented prompt format (the Hermes/SmolLM2 one): the tools are listed as
JSON inside `<tools></tools>` in the system prompt and a call is written as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. When a call is required
(`tool_choice` "any"/"required"/a name, or `tool_call_mode="first_turn"` after a user turn)
the call is pre-started and its JSON written by us, one argument at a time: the model only
fills each value, under a stop sequence fitting the argument's type, so small models produce
well-formed calls. Each of those steps is a guarded request: if the gate refuses the
conversation, the answer is the refusal text and no tool is called.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, SecretStr

from guardrail.decision import Answer
from guardrail.errors import InputError, OverloadedError
from guardrail.serve.exchange import run_sync
from guardrail.serve.guard import Guard
from guardrail.tools import render_tool_call, with_tools

EMBEDDED = "embedded"
_GUARDS: dict[tuple[str, str | None, str | None], Guard] = {}
_GUARDS_LOCK = threading.Lock()
_REFUSED_PATHS = {"refused", "timeout"}
_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)


def shared_guard(model: str, policies: str | None, redis_url: str | None) -> Guard:
    """The process-wide Guard for this model, policy folder and Redis (made on first use)."""
    key = (model, policies, redis_url)
    with _GUARDS_LOCK:
        guard = _GUARDS.get(key)
        if guard is None:
            from guardrail.runtime.model import EMBEDDED_DEFAULT, load_model

            lm = load_model(EMBEDDED_DEFAULT if model == EMBEDDED else model)
            guard = Guard(lm, policies=policies, redis_url=redis_url)
            _GUARDS[key] = guard
        return guard


def use_guard(
    guard: Guard, model: str = EMBEDDED, policies: str | None = None, redis_url: str | None = None
) -> None:
    """Serve `GuardedChatModel(model=..., policies=..., redis_url=...)` from this Guard (one
    the service already runs, say) instead of loading another."""
    with _GUARDS_LOCK:
        _GUARDS[(model, policies, redis_url)] = guard


def _text(content: Any) -> str:
    """Message content as text; non-text blocks are an error (this model reads text only)."""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("tool_use", "tool_call"):
            continue  # rendered from `tool_calls`
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InputError(f"content blocks of type {kind!r} are not supported: text only")
    return "".join(parts)


def to_chat(
    messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]]
) -> list[dict[str, str]]:
    """LangChain messages as role/content turns, tool calls and results in the prompt format."""
    chat: list[dict[str, str]] = []
    for message in messages:
        content = _text(message.content)
        if isinstance(message, AIMessage):
            calls = [render_tool_call(c["name"], c["args"]) for c in message.tool_calls]
            chat.append({"role": "assistant", "content": "\n".join([content, *calls]).strip()})
        elif isinstance(message, ToolMessage):
            status = " (error)" if message.status == "error" else ""
            chat.append(
                {"role": "tool", "content": f"<tool_response{status}>\n{content}\n</tool_response>"}
            )
        else:
            role = {"human": "user", "system": "system"}.get(message.type, message.type)
            chat.append({"role": role, "content": content})
    return with_tools(chat, tools)


def parse_tool_calls(text: str, names: Sequence[str]) -> tuple[str, list[ToolCall]]:
    """Split a free answer into its text and the well-formed calls of known tools."""
    calls: list[ToolCall] = []
    for match in _TOOL_CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(body, dict) and body.get("name") in names:
            args = body.get("arguments") or {}
            if isinstance(args, dict):
                calls.append(
                    ToolCall(name=body["name"], args=args, id=_call_id(), type="tool_call")
                )
    return _TOOL_CALL.sub("", text).strip() if calls else text, calls


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _forced_name(tool_choice: Any, names: Sequence[str]) -> str | None:
    """The tool `tool_choice` names, if it names one."""
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    return None


def _value(raw: str, kind: str) -> Any:
    """A generated argument value, read as its JSON-schema type (best effort, never raises)."""
    raw = raw.strip()
    if kind == "string":
        return raw
    if kind in ("integer", "number"):
        found = re.search(r"-?\d+(?:\.\d+)?", raw)
        if not found:
            return 0
        number = float(found.group())
        return int(number) if kind == "integer" else number
    if kind == "boolean":
        return raw.lower().startswith("t")
    for end in range(len(raw), 0, -1):  # objects, arrays: the longest prefix that parses
        try:
            return json.loads(raw[:end])
        except json.JSONDecodeError:
            continue
    return None


class GuardedChatModel(BaseChatModel):
    """A chat model whose every answer passed the guard (see the module docstring)."""

    model_config = ConfigDict(populate_by_name=True)

    model: str = Field(default=EMBEDDED, alias="model_name")
    """Hugging Face id, local path or .gguf file; `embedded` is SmolLM2-135M-Instruct."""
    tenant: str = "default"
    temperature: float | None = None
    """None: the tenant policy's (0, greedy, by default)."""
    max_tokens: int | None = None
    """None: the tenant policy's `generation.max_new_tokens`."""
    stop: list[str] | None = None
    timeout: float | None = None
    """Seconds; None: the tenant policy's. On expiry the refusal text (fail closed)."""
    max_retries: int = 2
    """Retries when the worker's queue is full."""
    policies: str | None = None
    """A folder of tenant policy files; None: the shipped default policy."""
    redis_url: str | None = None
    policy_overrides: dict[str, Any] = Field(default_factory=dict)
    """Per-request options for the guard, e.g. `{"top_p": 0.9, "seed": 1}`."""
    tool_call_mode: Literal["model", "first_turn"] = "model"
    """`model`: with tool_choice auto, the model decides whether to call a tool. `first_turn`:
    after a user turn a tool call is required (pre-started), after a tool result the model
    answers in text; for small models that rarely start a call on their own."""
    streaming: bool = False
    api_key: SecretStr | None = None
    """Accepted for compatibility with hosted chat models; a local model needs none."""

    @property
    def _llm_type(self) -> str:
        return "guardrail"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "tenant": self.tenant, "policies": self.policies}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="guardrail",
            ls_model_name=kwargs.get("model", self.model),
            ls_model_type="chat",
        )
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # --- tools ---------------------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | dict[str, Any] | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Tools in the prompt format of the module docstring; `tool_choice`: auto (default),
        none, any/required/True (some tool), or a tool's name."""
        formatted = [convert_to_openai_tool(t) for t in tools]
        names = [t["function"]["name"] for t in formatted]
        if tool_choice is True:
            tool_choice = "any"
        if tool_choice not in (None, "auto", "none", "any", "required") and not _forced_name(
            tool_choice, names
        ):
            raise ValueError(f"tool_choice {tool_choice!r} names no bound tool ({names})")
        return super().bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # --- generation ----------------------------------------------------------------------------

    def _guard(self, model: str | None = None) -> Guard:
        return shared_guard(model or self.model, self.policies, self.redis_url)

    def _options(self, stop: list[str] | None, max_new_tokens: int | None = None) -> dict[str, Any]:
        options: dict[str, Any] = {**self.policy_overrides}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if max_new_tokens or self.max_tokens:
            options["max_new_tokens"] = max_new_tokens or self.max_tokens
        if self.timeout is not None:
            options["timeout"] = self.timeout
        stops = [*(self.stop or []), *(stop or [])]
        if stops:
            options["stop"] = stops
        return options

    async def _ask(self, guard: Guard, chat: list[dict[str, str]], **options: Any) -> Answer:
        for attempt in range(self.max_retries + 1):
            try:
                return await guard.generate(chat, tenant=self.tenant, **options)
            except OverloadedError:
                if attempt == self.max_retries:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def _answer(
        self, messages: list[BaseMessage], stop: list[str] | None, **kwargs: Any
    ) -> AIMessage:
        """The whole answer: free text (with any calls parsed out), or a required tool call."""
        tools: list[dict[str, Any]] = kwargs.pop("tools", None) or []
        tool_choice = kwargs.pop("tool_choice", None)
        guard = self._guard(kwargs.pop("model", None))
        if tool_choice == "none":
            tools = []
        chat = to_chat(messages, tools)
        names = [t["function"]["name"] for t in tools]
        required = bool(tools) and (
            tool_choice in ("any", "required")
            or _forced_name(tool_choice, names) is not None
            or (
                self.tool_call_mode == "first_turn"
                and tool_choice in (None, "auto")
                and messages[-1].type == "human"
            )
        )
        if required:
            return await self._tool_call(guard, chat, tools, _forced_name(tool_choice, names))
        answer = await self._ask(guard, chat, **self._options(stop))
        text, calls = parse_tool_calls(answer.text, names) if names else (answer.text, [])
        if answer.decision.path in _REFUSED_PATHS:
            text, calls = answer.text, []
        return self._message(text, [answer], calls)

    async def _tool_call(
        self,
        guard: Guard,
        chat: list[dict[str, str]],
        tools: list[dict[str, Any]],
        name: str | None,
    ) -> AIMessage:
        """Write the call's JSON ourselves; the model fills the tool name (when several could
        be called) and each argument value. Any refused step refuses the whole answer."""
        answers: list[Answer] = []
        names = [t["function"]["name"] for t in tools]

        async def fill(prefix: str, stop: list[str], tokens: int = 32) -> str | None:
            tokens = min(tokens, self.max_tokens or tokens)
            options = {**self._options(None, tokens), "response_prefix": prefix, "stop": stop}
            answer = await self._ask(guard, chat, **options)
            answers.append(answer)
            return None if answer.decision.path in _REFUSED_PATHS else answer.text

        start = '<tool_call>\n{"name": "'
        if name is None:
            if len(names) == 1:
                name = names[0]
            else:
                said = await fill(start, ['"', "\n"], 12)
                if said is None:
                    return self._message(answers[-1].text, answers, [])
                close = difflib.get_close_matches(said.strip(), names, n=1, cutoff=0.0)
                name = close[0] if close else names[0]
        schema = next(t for t in tools if t["function"]["name"] == name)["function"]
        properties: dict[str, Any] = (schema.get("parameters") or {}).get("properties") or {}
        args: dict[str, Any] = {}
        for key, spec in properties.items():
            kind = spec.get("type", "string") if isinstance(spec, dict) else "string"
            if isinstance(spec, dict) and "anyOf" in spec:  # Optional[...]: the first real type
                kinds = [s.get("type") for s in spec["anyOf"] if s.get("type") != "null"]
                kind = kinds[0] if kinds else "string"
            so_far = json.dumps(args, ensure_ascii=False)[:-1]
            prefix = f'{start}{name}", "arguments": {so_far}{", " if args else ""}"{key}": '
            if kind == "string":
                said = await fill(prefix + '"', ['"', "\n"])
            else:
                said = await fill(prefix, [",", "}", "\n"])
            if said is None:
                return self._message(answers[-1].text, answers, [])
            args[key] = _value(said, kind)
        if not answers:  # a call without arguments still passes the gate
            said = await fill(f'{start}{name}", "arguments": {{', ["}"], 1)
            if said is None:
                return self._message(answers[-1].text, answers, [])
        call = ToolCall(name=name, args=args, id=_call_id(), type="tool_call")
        return self._message("", answers, [call])

    def _message(self, text: str, answers: list[Answer], calls: list[ToolCall]) -> AIMessage:
        first = answers[0]
        input_tokens = sum(a.decision.prompt_tokens for a in answers)
        output_tokens = sum(a.decision.new_tokens for a in answers)
        return AIMessage(
            content=text,
            tool_calls=calls,
            response_metadata={
                "model_name": self.model,
                "model_provider": "guardrail",
                "guard": first.decision.as_dict(),
                "guard_steps": len(answers),
            },
            usage_metadata={
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        await asyncio.to_thread(self._guard, kwargs.get("model"))  # a first load: off the loop
        message = await self._answer(messages, stop, **kwargs)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._guard(kwargs.get("model"))  # a first load: here, not on the exchange's loop
        message = run_sync(self._answer(messages, stop, **kwargs))
        return ChatResult(generations=[ChatGeneration(message=message)])

    # --- streaming -----------------------------------------------------------------------------

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Text as the guard releases it (each chunk checked first); with tools bound, the
        whole answer at once, so that a call is parsed before anything is shown."""
        guard = await asyncio.to_thread(self._guard, kwargs.get("model"))  # off the loop
        if kwargs.get("tools") and kwargs.get("tool_choice") != "none":
            for chunk in _chunks(await self._answer(messages, stop, **kwargs)):
                yield chunk
            return
        stream = guard.stream(to_chat(messages, []), tenant=self.tenant, **self._options(stop))
        async for text in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                await run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
        assert stream.result is not None
        yield _last_chunk(self._message("", [stream.result], []))

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        guard = self._guard(kwargs.get("model"))
        if kwargs.get("tools") and kwargs.get("tool_choice") != "none":
            yield from _chunks(run_sync(self._answer(messages, stop, **kwargs)))
            return
        stream = guard.stream_sync(to_chat(messages, []), tenant=self.tenant, **self._options(stop))
        for text in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
            if run_manager:
                run_manager.on_llm_new_token(text, chunk=chunk)
            yield chunk
        assert stream.result is not None
        yield _last_chunk(self._message("", [stream.result], []))


def _last_chunk(message: AIMessage) -> ChatGenerationChunk:
    """The closing chunk: usage and the guard's decision, once per answer."""
    return ChatGenerationChunk(
        message=AIMessageChunk(
            content=message.content,
            response_metadata=message.response_metadata,
            usage_metadata=message.usage_metadata,
            chunk_position="last",
        )
    )


def _chunks(message: AIMessage) -> Iterator[ChatGenerationChunk]:
    """A finished answer as stream chunks: its text, each call whole, then the closing chunk."""
    if message.content:
        yield ChatGenerationChunk(message=AIMessageChunk(content=message.content))
    for index, call in enumerate(message.tool_calls):
        chunk = tool_call_chunk(
            name=call["name"],
            args=json.dumps(call["args"], ensure_ascii=False),
            id=call["id"],
            index=index,
        )
        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[chunk]))
    yield _last_chunk(
        AIMessage(
            content="",
            response_metadata=message.response_metadata,
            usage_metadata=message.usage_metadata,
        )
    )


__all__ = [
    "GuardedChatModel",
    "parse_tool_calls",
    "render_tool_call",
    "shared_guard",
    "to_chat",
    "use_guard",
]
