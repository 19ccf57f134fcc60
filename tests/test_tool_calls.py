"""The tool-call format (guardrail/tools.py) and the worker's call-opening probe, on a tiny
random model (mechanics only); the calls themselves are tested through the HTTP server
(test_server.py) and LangChain (test_langchain.py) on the real model."""

from __future__ import annotations

import pytest
import torch

from conftest import _tiny
from guardrail.errors import InputError
from guardrail.runtime.forward import Sampling
from guardrail.serve.tool_calls import check_choice
from guardrail.serve.worker import LocalWorker, Request, answer_all
from guardrail.tools import (
    TOOL_CALL_OPEN,
    Call,
    after_tool_result,
    argument_kind,
    assistant_turn,
    forced_name,
    parse_tool_calls,
    read_value,
    render_tool_call,
    tool_turn,
    with_tools,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def test_calls_round_trip_through_the_prompt_format() -> None:
    turn = assistant_turn("Let me check.", [Call("get_weather", {"location": "東京"})])
    text, calls = parse_tool_calls(turn["content"], ["get_weather"])
    assert text == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"location": "東京"})]
    assert calls[0].id.startswith("call_") and calls[0].arguments_json() == '{"location": "東京"}'
    # unknown tools and broken JSON are text, not calls
    assert parse_tool_calls(render_tool_call("other", {}), ["get_weather"])[1] == []
    broken = '<tool_call>{"name": "get_weather", "arguments": {</tool_call>'
    assert parse_tool_calls(broken, ["get_weather"]) == (broken, [])
    chat = with_tools([{"role": "system", "content": "Be brief."}], [WEATHER])
    assert chat[0]["content"].startswith("Be brief.") and '"get_weather"' in chat[0]["content"]
    assert tool_turn("rain", error=True)["content"].startswith("<tool_response (error)>")


def test_after_a_tool_result_and_choices() -> None:
    user = {"role": "user", "content": "Weather?"}
    call = assistant_turn("", [Call("get_weather", {"location": "Oslo"})])
    assert not after_tool_result([user])
    assert after_tool_result([user, call, tool_turn("sunny")])
    assert not after_tool_result([user, call, tool_turn("sunny"), user])
    assert forced_name({"type": "function", "function": {"name": "get_weather"}}, ["get_weather"])
    assert forced_name("nope", ["get_weather"]) is None
    check_choice("required", [WEATHER])
    with pytest.raises(InputError, match="names no given tool"):
        check_choice("nope", [WEATHER])
    with pytest.raises(InputError, match="needs at least one tool"):
        check_choice("required", [])
    assert argument_kind({"anyOf": [{"type": "null"}, {"type": "integer"}]}) == "integer"
    assert read_value(" 42 apples", "integer") == 42 and read_value("true", "boolean") is True
    assert read_value('{"a": 1}, "b"', "object") == {"a": 1}


def test_probe_is_the_first_answer_tokens_probability_in_any_batch() -> None:
    """The worker reports P(first answer token = the probe's first token) from its prefill:
    the same, within float error, as a forward pass of that prompt alone, whatever the batch."""
    lm = _tiny("llama")
    prompts = ["Hi", "What is the weather in Paris? Please check it for me, thanks."]
    worker = LocalWorker(lm, None, max_batch=4, start=False)
    requests = [
        Request(
            with_tools([{"role": "user", "content": prompt}], [WEATHER]),
            Sampling(max_new_tokens=2),
            guarded=False,
            probe=TOOL_CALL_OPEN,
        )
        for prompt in prompts
    ]
    no_probe = Request("no probe", Sampling(max_new_tokens=2), guarded=False)
    got = [item.outcome for item in answer_all(worker, [*requests, no_probe], timeout=60)]
    worker.close()
    first = lm.tokenizer(TOOL_CALL_OPEN, add_special_tokens=False)["input_ids"][0]
    assert got[2].decision.first_token_prob is None
    for prompt, answer in zip(prompts, got[:2], strict=True):
        chat = with_tools([{"role": "user", "content": prompt}], [WEATHER])
        ids = lm.tokenizer(lm.format_chat(chat), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            logits = lm.model(input_ids=ids["input_ids"]).logits[0, -1].float()
        expected = float(torch.softmax(logits, -1)[first])
        assert answer.decision.first_token_prob == pytest.approx(expected, rel=1e-3, abs=1e-7)
