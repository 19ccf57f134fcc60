"""Answering with tools, the one path every front end uses (the HTTP server, LangChain).

Whether to call: with `tool_choice` "required"/"any" or a tool's name, always; with "none",
never (the tools are left out of the prompt); with "auto", `mode` decides:
- `auto` (default): the model's own probability of opening a call. The worker reads, from the
  prefill logits it computes anyway, the probability that the answer's first token opens a
  call (`Decision.first_token_prob`); above `AUTO_CALL_THRESHOLD` a call is written, unless a
  tool result already answered the user's turn. Small models often put real mass on a call
  without making it the most likely token, so free generation alone rarely calls.
- `model`: only a call the model writes in its free answer.
- `first_turn`: a call after every user turn, a text answer after a tool result.

Writing the call: it is pre-started and its JSON written here, one argument at a time; the
model only fills each value, under a stop sequence fitting the argument's type, so small
models produce well-formed calls. Each step is a guarded request: if the gate refuses the
conversation, the answer is the refusal text and no tool is called.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guardrail.decision import Answer, Decision
from guardrail.errors import InputError
from guardrail.tools import (
    TOOL_CALL_OPEN,
    Call,
    Tool,
    after_tool_result,
    argument_kind,
    forced_name,
    parse_tool_calls,
    read_value,
    tool_names,
    with_tools,
)

Chat = list[dict[str, str]]
Ask = Callable[[Chat, dict[str, Any]], Awaitable[Answer]]
"""One guarded request: the chat and the Guard's options (`max_new_tokens`, `stop`, ...)."""
Mode = Literal["auto", "model", "first_turn"]

# The probability of opening a call above which `auto` calls, for the embedded SmolLM2-135M:
# chosen on the fit half of bench/bench_tool_calls.py's labelled prompts (0.01398, rounded);
# on the test half it calls 0.66 of the time when it should, 0.22 when it should not, never
# right after a tool result (AUROC 0.84; 2026-12-06).
AUTO_CALL_THRESHOLD = 0.014
CHOICES = (None, "auto", "none", "any", "required")
_REFUSED_PATHS = {"refused", "timeout"}
_CALL_START = TOOL_CALL_OPEN + '\n{"name": "'


@dataclass
class ToolAnswer:
    """The answer's text, its calls (none when refused) and every guarded step it took."""

    text: str
    calls: list[Call]
    answers: list[Answer]

    @property
    def refused(self) -> bool:
        return any(refused(a) for a in self.answers)

    @property
    def decision(self) -> Decision:
        """The decision to report: the refusing step's, else the first step's."""
        return next((a.decision for a in self.answers if refused(a)), self.answers[0].decision)

    @property
    def prompt_tokens(self) -> int:
        return sum(a.decision.prompt_tokens for a in self.answers)

    @property
    def new_tokens(self) -> int:
        return sum(a.decision.new_tokens for a in self.answers)


def refused(answer: Answer) -> bool:
    return answer.decision.path in _REFUSED_PATHS


def check_choice(tool_choice: Any, tools: Sequence[Tool]) -> None:
    """A clear error for a `tool_choice` that is neither a mode nor a bound tool's name."""
    names = tool_names(tools)
    if tool_choice not in CHOICES and forced_name(tool_choice, names) is None:
        raise InputError(f"tool_choice {tool_choice!r} names no given tool ({names})")
    if tool_choice in ("any", "required") and not tools:
        raise InputError(f"tool_choice {tool_choice!r} needs at least one tool")


def wants_call(
    answer: Answer, chat: Sequence[dict[str, str]], threshold: float = AUTO_CALL_THRESHOLD
) -> bool:
    """`auto`'s rule: the model's probability of opening a call is over the threshold, and no
    tool result answered the user's turn yet."""
    prob = answer.decision.first_token_prob
    return prob is not None and prob > threshold and not after_tool_result(chat)


async def answer_with_tools(
    ask: Ask,
    chat: Chat,
    tools: Sequence[Tool],
    tool_choice: Any = None,
    *,
    mode: Mode = "auto",
    threshold: float = AUTO_CALL_THRESHOLD,
    options: dict[str, Any] | None = None,
) -> ToolAnswer:
    """Answer `chat` (role/content turns, calls and results already rendered) with `tools`."""
    options = dict(options or {})
    if not tools or tool_choice == "none":
        answer = await ask(chat, options)
        return ToolAnswer(answer.text, [], [answer])
    check_choice(tool_choice, tools)
    names = tool_names(tools)
    prompt = with_tools(chat, tools)
    named = forced_name(tool_choice, names)
    first_turn = mode == "first_turn" and bool(chat) and chat[-1]["role"] == "user"
    if tool_choice in ("any", "required") or named is not None or first_turn:
        return await write_call(ask, prompt, tools, named, options)
    first = await ask(prompt, {**options, "probe": TOOL_CALL_OPEN})
    if refused(first):
        return ToolAnswer(first.text, [], [first])
    text, calls = parse_tool_calls(first.text, names)
    if calls:
        return ToolAnswer(text, calls, [first])
    if mode == "auto" and wants_call(first, chat, threshold):
        return await write_call(ask, prompt, tools, None, options, [first])
    return ToolAnswer(text, [], [first])


async def write_call(
    ask: Ask,
    prompt: Chat,
    tools: Sequence[Tool],
    name: str | None,
    options: dict[str, Any],
    earlier: Sequence[Answer] = (),
) -> ToolAnswer:
    """Write one call's JSON; the model fills the tool name (when several could be called) and
    each argument value. Any refused step refuses the whole answer. `earlier`: steps already
    taken for this answer (counted in its usage)."""
    answers: list[Answer] = list(earlier)
    names = tool_names(tools)
    limit = options.get("max_new_tokens")

    async def fill(prefix: str, stop: list[str], tokens: int = 32) -> str | None:
        tokens = min(tokens, limit or tokens)
        step = {**options, "max_new_tokens": tokens, "response_prefix": prefix, "stop": stop}
        answer = await ask(prompt, step)
        answers.append(answer)
        return None if refused(answer) else answer.text

    def refusal() -> ToolAnswer:
        return ToolAnswer(answers[-1].text, [], answers)

    if name is None:
        if len(names) == 1:
            name = names[0]
        else:
            said = await fill(_CALL_START, ['"', "\n"], 12)
            if said is None:
                return refusal()
            close = difflib.get_close_matches(said.strip(), names, n=1, cutoff=0.0)
            name = close[0] if close else names[0]
    schema = next(t for t in tools if t["function"]["name"] == name)["function"]
    properties: dict[str, Any] = (schema.get("parameters") or {}).get("properties") or {}
    args: dict[str, Any] = {}
    for key, spec in properties.items():
        kind = argument_kind(spec)
        so_far = json.dumps(args, ensure_ascii=False)[:-1]
        prefix = f'{_CALL_START}{name}", "arguments": {so_far}{", " if args else ""}"{key}": '
        if kind == "string":
            said = await fill(prefix + '"', ['"', "\n"])
        else:
            said = await fill(prefix, [",", "}", "\n"])
        if said is None:
            return refusal()
        args[key] = read_value(said, kind)
    if not answers:  # a call without arguments still passes the gate
        said = await fill(f'{_CALL_START}{name}", "arguments": {{', ["}"], 1)
        if said is None:
            return refusal()
    return ToolAnswer("", [Call(name, args)], answers)


__all__ = [
    "AUTO_CALL_THRESHOLD",
    "Ask",
    "Mode",
    "ToolAnswer",
    "answer_with_tools",
    "check_choice",
    "wants_call",
    "write_call",
]
