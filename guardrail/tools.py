"""The tool-calling prompt format (Hermes/SmolLM2): tools listed as JSON inside `<tools></tools>`
in the system prompt, a call written as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

In the core rather than an adapter: calibration shows the gate requests under this system
prompt, so the gate learns to read the request and not the tool list around it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def tools_prompt(tools: Sequence[dict[str, Any]]) -> str:
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


def with_tools(chat: list[dict[str, str]], tools: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The chat with the tools block appended to its system prompt (or as one, if it has none)."""
    if not tools:
        return chat
    block = tools_prompt(tools)
    if chat and chat[0]["role"] == "system":
        return [{"role": "system", "content": f"{chat[0]['content']}\n\n{block}"}, *chat[1:]]
    return [{"role": "system", "content": block}, *chat]


def render_tool_call(name: str, args: dict[str, Any]) -> str:
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"
