"""LangChain: `GuardedChatModel`, a real `BaseChatModel` over the shared guard.

Agents use it unchanged (`bind_tools`, `with_structured_output`, streaming, async): every
request goes through the same `Guard` as the Python API, so the gate, steering and the
tenant's policy apply, and each message carries the guard's decision record in
`response_metadata["guard"]`. Instances are cheap; those for the same model, policy folder
and Redis share one Guard (and model worker) per process, loaded on first use.

Tool calls go through the core (`guardrail.serve.tool_calls`, the same path as the HTTP
server's `tools`): the Hermes/SmolLM2 prompt format, calls written argument by argument, each
step a guarded request (a refused conversation gets the refusal text and no call). With
`tool_choice` auto, `tool_call_mode="auto"` (default) calls when the model's own probability
of opening a call is over a measured threshold, so agents built with default parameters call
their tools.
"""

from __future__ import annotations

import asyncio
import json
import threading
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
from guardrail.serve.tool_calls import AUTO_CALL_THRESHOLD, ToolAnswer, answer_with_tools
from guardrail.tools import (
    Call,
    assistant_turn,
    forced_name,
    tool_turn,
    with_tools,
)

EMBEDDED = "embedded"
_GUARDS: dict[tuple[str, str | None, str | None], Guard] = {}
_GUARDS_LOCK = threading.Lock()


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
            calls = [Call(c["name"], c["args"], c.get("id") or "") for c in message.tool_calls]
            chat.append(assistant_turn(content, calls))
        elif isinstance(message, ToolMessage):
            chat.append(tool_turn(content, error=message.status == "error"))
        else:
            role = {"human": "user", "system": "system"}.get(message.type, message.type)
            chat.append({"role": role, "content": content})
    return with_tools(chat, tools)


def _tool_call(call: Call) -> ToolCall:
    return ToolCall(name=call.name, args=call.arguments, id=call.id, type="tool_call")


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
    tool_call_mode: Literal["auto", "model", "first_turn"] = "auto"
    """With tool_choice auto: `auto` calls when the model's probability of opening a call is over
    `tool_call_threshold` (never right after a tool result); `model` only when its free answer
    writes a call; `first_turn` after every user turn (see `guardrail.serve.tool_calls`)."""
    tool_call_threshold: float = AUTO_CALL_THRESHOLD
    """`auto`'s threshold; the default is measured for the embedded model."""
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
        if tool_choice not in (None, "auto", "none", "any", "required") and not forced_name(
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
        """The whole answer: text, or tool calls (see `guardrail.serve.tool_calls`)."""
        tools: list[dict[str, Any]] = kwargs.pop("tools", None) or []
        tool_choice = kwargs.pop("tool_choice", None)
        guard = self._guard(kwargs.pop("model", None))

        async def ask(chat: list[dict[str, str]], options: dict[str, Any]) -> Answer:
            return await self._ask(guard, chat, **options)

        answer = await answer_with_tools(
            ask,
            to_chat(messages, []),
            tools,
            tool_choice,
            mode=self.tool_call_mode,
            threshold=self.tool_call_threshold,
            options=self._options(stop),
        )
        return self._message(answer)

    def _message(self, answer: ToolAnswer) -> AIMessage:
        input_tokens, output_tokens = answer.prompt_tokens, answer.new_tokens
        return AIMessage(
            content=answer.text,
            tool_calls=[_tool_call(c) for c in answer.calls],
            response_metadata={
                "model_name": self.model,
                "model_provider": "guardrail",
                "guard": answer.decision.as_dict(),
                "guard_steps": len(answer.answers),
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
        yield _last_chunk(self._message(ToolAnswer("", [], [stream.result])))

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
        yield _last_chunk(self._message(ToolAnswer("", [], [stream.result])))


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
    "shared_guard",
    "to_chat",
    "use_guard",
]
