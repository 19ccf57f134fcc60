"""The tool-calling prompt format (Hermes/SmolLM2): tools listed as JSON inside `<tools></tools>`
in the system prompt, a call written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
a result given back as `<tool_response>...</tool_response>` in a `tool` turn.

In the core rather than an adapter: every front end (the LangChain model, the HTTP server)
renders and parses calls the same way, and calibration shows the gate requests under this
system prompt, so the gate learns to read the request and not the tool list around it.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

Tool = dict[str, Any]  # OpenAI's shape: {"type": "function", "function": {"name", "parameters"}}


@dataclass(frozen=True)
class Call:
    """One tool call: the tool's name, its arguments and an OpenAI-style id."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: new_call_id())

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_names(tools: Sequence[Tool]) -> list[str]:
    return [str(t["function"]["name"]) for t in tools]


def tools_prompt(tools: Sequence[Tool]) -> str:
    """The system-prompt block that lists the tools and the call format."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You are a function calling AI model. You are provided with function signatures "
        "within <tools></tools> XML tags. You may call one or more functions to assist with "
        "the user query. Don't make assumptions about what values to plug into functions.\n"
        f"<tools>\n{listed}\n</tools>\n"
        "For each function call return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>'
    )


def with_tools(chat: list[dict[str, str]], tools: Sequence[Tool]) -> list[dict[str, str]]:
    """The chat with the tools block appended to its system prompt (or as one, if it has none)."""
    if not tools:
        return chat
    block = tools_prompt(tools)
    if chat and chat[0]["role"] == "system":
        return [{"role": "system", "content": f"{chat[0]['content']}\n\n{block}"}, *chat[1:]]
    return [{"role": "system", "content": block}, *chat]


def render_tool_call(name: str, args: dict[str, Any]) -> str:
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n</tool_call>"


def assistant_turn(content: str, calls: Sequence[Call]) -> dict[str, str]:
    """An assistant turn that made calls, as the model would have written it."""
    rendered = [render_tool_call(c.name, c.arguments) for c in calls]
    return {"role": "assistant", "content": "\n".join([content, *rendered]).strip()}


def tool_turn(content: str, *, error: bool = False) -> dict[str, str]:
    """A tool's result, given back to the model."""
    status = " (error)" if error else ""
    return {"role": "tool", "content": f"<tool_response{status}>\n{content}\n</tool_response>"}


def after_tool_result(chat: Sequence[dict[str, str]]) -> bool:
    """Whether a tool result came after the last user turn (the call was made and answered)."""
    for message in reversed(chat):
        if message["role"] == "tool":
            return True
        if message["role"] == "user":
            return False
    return False


def parse_tool_calls(text: str, names: Sequence[str]) -> tuple[str, list[Call]]:
    """Split a free answer into its text and the well-formed calls of known tools."""
    calls: list[Call] = []
    for match in _TOOL_CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(body, dict) and body.get("name") in names:
            args = body.get("arguments") or {}
            if isinstance(args, dict):
                calls.append(Call(str(body["name"]), args))
    return _TOOL_CALL.sub("", text).strip() if calls else text, calls


def forced_name(tool_choice: Any, names: Sequence[str]) -> str | None:
    """The tool `tool_choice` names (a name, or OpenAI's/LangChain's dict), if it names one."""
    if isinstance(tool_choice, dict):
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    return None


def argument_kind(spec: Any) -> str:
    """An argument's JSON-schema type; `Optional[...]` (anyOf with null) reads as the real one."""
    if not isinstance(spec, dict):
        return "string"
    if "anyOf" in spec:
        kinds = [s.get("type") for s in spec["anyOf"] if isinstance(s, dict)]
        kinds = [k for k in kinds if k and k != "null"]
        return str(kinds[0]) if kinds else "string"
    return str(spec.get("type", "string"))


def read_value(raw: str, kind: str) -> Any:
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
