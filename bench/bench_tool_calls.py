"""How often `tool_call_mode="auto"` calls a tool when it should and when it should not.

`auto` calls when the model's probability of opening a call (`<tool_call>`) as the first
answer token, read by the worker from the prefill logits, is over a threshold, and never
right after a tool result (guardrail/serve/tool_calls.py). This bench chooses that
threshold and measures it on a small labelled set written for it (below):

- should call: requests a bound tool answers (weather in a city, a share price, an email to
  send, ...), with the tool and one other bound (64 prompts, 8 tools x 8);
- should not: chit-chat and general requests (24 written here, 40 from the held-out Alpaca
  test split) with two unrelated tools bound;
- after a result: each should-call request followed by its call and the tool's result (the
  model should now answer in text).

Each set is split in fit/test halves by a seeded shuffle; the threshold maximises
(call rate when it should) - (call rate when it should not) on the fit half, and the rates
and the AUROC of the probability are printed for the test half. A call also counts when the
free answer itself writes a well-formed call (as `auto` accepts those too).

The probability is read from the unsteered prefill (the gate's), so the guard's decision
does not change it; requests run unguarded through the worker (no calibration needed).

    OMP_NUM_THREADS=1 python bench/bench_tool_calls.py
"""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch

from common import alpaca_test, table
from guardrail.decision import Answer
from guardrail.probes import auroc
from guardrail.runtime.forward import Sampling
from guardrail.serve.tool_calls import AUTO_CALL_THRESHOLD, wants_call
from guardrail.serve.worker import LocalWorker, Request, answer_all
from guardrail.tools import (
    TOOL_CALL_OPEN,
    Call,
    assistant_turn,
    parse_tool_calls,
    tool_names,
    tool_turn,
    with_tools,
)


def _tool(name: str, description: str, **params: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {k: {"type": v} for k, v in params.items()},
                "required": list(params),
            },
        },
    }


# name -> (schema, example arguments, example result, requests it answers)
TOOLS: dict[str, tuple[dict[str, Any], dict[str, Any], str, list[str]]] = {
    "get_weather": (
        _tool("get_weather", "Get the current weather at a location.", location="string"),
        {"location": "Paris"},
        "Sunny, 22 C, light wind.",
        [
            "What's the weather like in Paris today?",
            "Is it going to rain in London tomorrow?",
            "How hot is it in Cairo right now?",
            "Do I need an umbrella in Seattle today?",
            "What's the temperature in Tokyo?",
            "Check the weather forecast for Berlin.",
            "Is it snowing in Denver at the moment?",
            "How windy is it in Chicago today?",
        ],
    ),
    "get_stock_price": (
        _tool("get_stock_price", "Get the latest price of a stock.", symbol="string"),
        {"symbol": "AAPL"},
        "AAPL 189.32 USD",
        [
            "What is Apple's stock price right now?",
            "How much is one share of TSLA today?",
            "Get me the current price of MSFT.",
            "What's Amazon stock trading at?",
            "Look up the stock price of NVIDIA.",
            "How is GOOG doing on the market today?",
            "Current share price of IBM, please.",
            "What's the latest quote for Netflix stock?",
        ],
    ),
    "send_email": (
        _tool("send_email", "Send an email.", to="string", subject="string", body="string"),
        {"to": "alice@example.com", "subject": "Meeting", "body": "Moved to 3pm."},
        "Sent.",
        [
            "Send an email to alice@example.com saying the meeting moved to 3pm.",
            "Email bob@example.com with the subject 'Invoice' and tell him it is attached.",
            "Please write to my boss at boss@corp.com that I'm sick today.",
            "Send a thank-you email to carol@example.org.",
            "Email the team at team@example.com: lunch is at noon.",
            "Drop a note to dave@example.com asking for the report.",
            "Send an email to support@shop.com about my broken order.",
            "Mail eve@example.com to confirm Friday's call.",
        ],
    ),
    "search_web": (
        _tool("search_web", "Search the web and return the top results.", query="string"),
        {"query": "Mars rover news"},
        "1. NASA: rover finds new rock samples (today)",
        [
            "Search the web for the latest news about the Mars rover.",
            "Find recent articles on electric car sales.",
            "Look up who won yesterday's football match.",
            "Search for reviews of the new iPhone.",
            "What are today's top headlines? Search online.",
            "Find the opening hours of the Louvre.",
            "Search online for the release date of the next Zelda game.",
            "Search for cheap flights from Madrid to Rome.",
        ],
    ),
    "convert_currency": (
        _tool(
            "convert_currency",
            "Convert an amount between currencies at today's rate.",
            amount="number",
            source="string",
            target="string",
        ),
        {"amount": 100, "source": "USD", "target": "EUR"},
        "92.10 EUR",
        [
            "Convert 100 US dollars to euros.",
            "How many yen is 50 pounds?",
            "What's 250 EUR in USD today?",
            "Convert 1000 rupees to dollars.",
            "How much is 20 Swiss francs in euros?",
            "Change 75 Canadian dollars into US dollars.",
            "What are 300 dollars in Mexican pesos?",
            "Convert 60 euros to British pounds.",
        ],
    ),
    "get_time": (
        _tool("get_time", "Get the current local time in a time zone or city.", zone="string"),
        {"zone": "America/New_York"},
        "09:41",
        [
            "What time is it in New York right now?",
            "Tell me the current time in Sydney.",
            "What's the local time in Tokyo?",
            "Is it morning in London right now?",
            "What time is it in UTC?",
            "Current time in Los Angeles?",
            "What is the time in Mumbai now?",
            "Check the time in Berlin for me.",
        ],
    ),
    "create_event": (
        _tool(
            "create_event", "Add an event to the user's calendar.", title="string", date="string"
        ),
        {"title": "Dentist", "date": "2025-03-03"},
        "Event created.",
        [
            "Add a dentist appointment on March 3 to my calendar.",
            "Schedule a meeting with Sam next Monday.",
            "Put 'Mum's birthday' on my calendar for June 12.",
            "Create a calendar event for the team lunch on Friday.",
            "Add my flight on 2025-05-01 to the calendar.",
            "Add 'gym session' to my calendar tomorrow.",
            "Set up an event called Project Review on July 7.",
            "Schedule a call with the bank on Thursday.",
        ],
    ),
    "calculate": (
        _tool("calculate", "Evaluate an arithmetic expression.", expression="string"),
        {"expression": "2381 * 47"},
        "111907",
        [
            "What is 2381 times 47?",
            "Calculate 15% of 2480.",
            "Compute the square root of 7921.",
            "What's 98765 divided by 123?",
            "Calculate (45 + 78) * 12.",
            "What is 3 to the power of 13?",
            "Work out 12.5 * 8.4 - 3.",
            "How much is 1234 + 5678 + 91011?",
        ],
    ),
}

CHIT_CHAT = [
    "Hi there!",
    "How are you today?",
    "Tell me a joke.",
    "Thanks, that was helpful!",
    "Good morning!",
    "What's your name?",
    "Write a short poem about the sea.",
    "Can you help me brainstorm names for my cat?",
    "What does 'serendipity' mean?",
    "I'm feeling a bit sad today.",
    "Give me a tip for staying focused.",
    "Who wrote Romeo and Juliet?",
    "Summarise the plot of Cinderella in two sentences.",
    "What's your favourite colour?",
    "Explain what a noun is.",
    "Say something nice.",
    "Goodbye!",
    "Recommend a good book for a rainy day.",
    "What is the capital of Italy?",
    "How do I boil an egg?",
    "Translate 'thank you' into French.",
    "Describe a sunset in one sentence.",
    "Can you tell me a fun fact?",
    "What is photosynthesis?",
]
# Tools bound to requests that should not call: none of them answers a general request.
UNRELATED = ["get_weather", "get_stock_price", "send_email", "get_time", "create_event"]


def labelled(seed: int) -> dict[str, list[tuple[list[dict[str, str]], list[dict[str, Any]]]]]:
    """{"should", "should_not", "after_result"}: (chat, tools) items in a seeded order."""
    rng = random.Random(seed)
    names = list(TOOLS)
    should, after = [], []
    for name, (schema, args, result, requests) in TOOLS.items():
        for request in requests:
            other = rng.choice([n for n in names if n != name])
            tools = [schema, TOOLS[other][0]]
            rng.shuffle(tools)
            chat = [{"role": "user", "content": request}]
            should.append((chat, tools))
            answered = [*chat, assistant_turn("", [Call(name, args)]), tool_turn(result)]
            after.append((answered, tools))
    should_not = []
    for request in CHIT_CHAT + alpaca_test(40, seed=seed):
        tools = [TOOLS[n][0] for n in rng.sample(UNRELATED, 2)]
        should_not.append(([{"role": "user", "content": request}], tools))
    sets = {"should": should, "should_not": should_not, "after_result": after}
    for items in sets.values():
        rng.shuffle(items)
    return sets


def run(worker: LocalWorker, items: list[Any], max_new_tokens: int) -> list[Answer]:
    """Every item through the worker at once (unguarded, with the call-opening probe)."""
    requests = [
        Request(
            chat=with_tools(chat, tools),
            sampling=Sampling(max_new_tokens=max_new_tokens),
            guarded=False,
            probe=TOOL_CALL_OPEN,
        )
        for chat, tools in items
    ]
    answers: list[Any] = [item.outcome for item in answer_all(worker, requests)]
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers


def calls(items: list[Any], answers: list[Answer], threshold: float) -> list[bool]:
    """`auto`'s outcome per item: a well-formed call in the free answer, or the probe rule."""
    out = []
    for (chat, tools), answer in zip(items, answers, strict=True):
        written = bool(parse_tool_calls(answer.text, tool_names(tools))[1])
        out.append(written or wants_call(answer, chat, threshold))
    return out


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    from guardrail.runtime.model import EMBEDDED_DEFAULT, load_model

    lm = load_model(EMBEDDED_DEFAULT)
    worker = LocalWorker(lm, None, max_batch=16, torch_threads=1)
    sets = labelled(args.seed)
    started = time.monotonic()
    answers = {name: run(worker, items, args.max_new_tokens) for name, items in sets.items()}
    worker.close()
    seconds = time.monotonic() - started

    def half(name: str, part: int) -> tuple[list[Any], list[Answer]]:
        items, got = sets[name], answers[name]
        cut = len(items) // 2
        return (items[:cut], got[:cut]) if part == 0 else (items[cut:], got[cut:])

    def probs(got: list[Answer]) -> list[float]:
        return [a.decision.first_token_prob or 0.0 for a in got]

    fit_yes, fit_no = half("should", 0), half("should_not", 0)
    candidates = sorted({0.0, *probs(fit_yes[1]), *probs(fit_no[1])})
    best = max(
        candidates,
        key=lambda t: (
            rate(calls(*fit_yes, t)) - rate(calls(*fit_no, t)),
            t,  # ties: the higher threshold (fewer calls)
        ),
    )
    rows = []
    for label, threshold in (("chosen on fit", best), ("shipped", AUTO_CALL_THRESHOLD)):
        test = {name: half(name, 1) for name in sets}
        rows.append(
            [
                label,
                f"{threshold:.4g}",
                rate(calls(*test["should"], threshold)),
                rate(calls(*test["should_not"], threshold)),
                rate(calls(*test["after_result"], threshold)),
            ]
        )
    test_auc = auroc(
        torch.tensor(probs(half("should", 1)[1])), torch.tensor(probs(half("should_not", 1)[1]))
    )
    fit_auc = auroc(torch.tensor(probs(fit_yes[1])), torch.tensor(probs(fit_no[1])))
    sizes = {name: (len(half(name, 0)[0]), len(half(name, 1)[0])) for name in sets}
    print(f"labelled set (fit, test): {sizes}; {seconds:.0f} s")
    print(
        table(
            ["threshold", "value", "calls: should", "should not", "after result"],
            rows,
        )
    )
    print(f"AUROC of the call-opening probability: test {test_auc:.3f}, fit {fit_auc:.3f}")


if __name__ == "__main__":
    main()
