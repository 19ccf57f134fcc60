"""One exchange for every entry point: the same outcome from generate, stream, both sync twins,
the LangChain model (invoke, ainvoke, stream, astream) and the HTTP server (plain and streamed)
under an internal error (both fail modes) and a deadline; the sync twins inside a running loop;
the shipped default policy's limits through `Guard()`; a clean exit of the README example.

Mechanics run on a tiny random model with a hand-made calibration (a real worker, faults
injected at the `Worker` interface); `Guard()` and the README example use the real model.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_worker import PROMPTS, hand_calibration

from conftest import _tiny
from guardrail.decision import Answer
from guardrail.errors import GuardrailError, InputError
from guardrail.integrations.langchain import GuardedChatModel, use_guard
from guardrail.serve.guard import Guard
from guardrail.serve.http import ApiKeys, create_app
from guardrail.serve.worker import LocalWorker, Request, Sink, Ticket
from guardrail.tenants.store import TenantPolicy

REFUSAL = "REFUSED BY POLICY"
PROMPT = PROMPTS[2]
MODEL = "tiny-exchange"
KEYS = {"refuse": "key-refuse", "error": "key-error"}


@pytest.fixture(scope="module")
def llama() -> Any:
    return _tiny("llama")


class _FaultySink:
    """Passes the first chunk on, then fails the request (`error`), or passes nothing (`stall`)."""

    def __init__(self, sink: Sink, mode: str) -> None:
        self.sink, self.mode = sink, mode
        self.ticket: Ticket | None = None
        self.chunks = 0
        self.ended = mode == "stall"

    def _end(self, error: BaseException) -> None:
        self.ended = True
        if self.ticket is not None:
            self.ticket.cancel()
        self.sink.fail(error)

    def chunk(self, text: str) -> None:
        if self.ended:
            return
        if self.chunks >= 1:
            self._end(GuardrailError("injected failure"))
            return
        self.chunks += 1
        self.sink.chunk(text)

    def done(self, answer: Answer) -> None:
        if not self.ended:
            self._end(GuardrailError("injected failure"))

    def fail(self, error: BaseException) -> None:
        if not self.ended:
            self._end(error)


class Faulty:
    """A real worker seen through the `Worker` interface, made to fail: `error` fails every
    request after its first released chunk (an internal error mid-answer), `stall` never
    answers (a hung worker: the exchange's own deadline has to answer)."""

    def __init__(self, inner: LocalWorker, mode: str) -> None:
        self.inner, self.mode = inner, mode
        self.calibration, self.scorers = inner.calibration, inner.scorers

    def submit(self, request: Request, sink: Sink) -> Ticket:
        faulty = _FaultySink(sink, self.mode)
        faulty.ticket = self.inner.submit(request, faulty)
        return faulty.ticket

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        self.inner.close(drain=drain, timeout=timeout)


Outcome = tuple[str, ...]  # ("answer", text, path) or ("raised", message)


def _answer(text: str, path: str) -> Outcome:
    return ("answer", text, path)


def _ends_with_refusal(chunks: list[str], text: str) -> str:
    """A stream's text; a fail-closed stream's last chunk is the refusal text itself."""
    joined = "".join(chunks)
    if text == REFUSAL:
        assert chunks and chunks[-1] == REFUSAL, chunks
    return joined


def entry_points(guard: Guard) -> dict[str, Callable[[str, dict[str, Any]], Outcome]]:
    """Each front end, its outcome in one shape."""
    use_guard(guard, model=MODEL)
    app = create_app(
        guard, ApiKeys.from_env(",".join(f"{t}={k}" for t, k in KEYS.items())), model_id=MODEL
    )
    client = TestClient(app)

    def generate(tenant: str, options: dict[str, Any]) -> Outcome:
        answer = asyncio.run(guard.generate(PROMPT, tenant=tenant, **options))
        return _answer(answer.text, answer.decision.path)

    def stream(tenant: str, options: dict[str, Any]) -> Outcome:
        async def run() -> Outcome:
            chunks = []
            async with guard.stream(PROMPT, tenant=tenant, **options) as stream:
                async for chunk in stream:
                    chunks.append(chunk)
            assert stream.result is not None
            _ends_with_refusal(chunks, stream.result.text)
            return _answer(stream.result.text, stream.result.decision.path)

        return asyncio.run(run())

    def generate_sync(tenant: str, options: dict[str, Any]) -> Outcome:
        answer = guard.generate_sync(PROMPT, tenant=tenant, **options)
        return _answer(answer.text, answer.decision.path)

    def stream_sync(tenant: str, options: dict[str, Any]) -> Outcome:
        stream = guard.stream_sync(PROMPT, tenant=tenant, **options)
        chunks = list(stream)
        assert stream.result is not None
        _ends_with_refusal(chunks, stream.result.text)
        return _answer(stream.result.text, stream.result.decision.path)

    def chat_model(tenant: str, options: dict[str, Any]) -> GuardedChatModel:
        return GuardedChatModel(
            model=MODEL, tenant=tenant, max_tokens=options["max_new_tokens"], max_retries=0
        )

    def lc_message(message: Any) -> Outcome:
        return _answer(str(message.content), message.response_metadata["guard"]["path"])

    def lc_invoke(tenant: str, options: dict[str, Any]) -> Outcome:
        return lc_message(chat_model(tenant, options).invoke(PROMPT))

    def lc_ainvoke(tenant: str, options: dict[str, Any]) -> Outcome:
        return lc_message(asyncio.run(chat_model(tenant, options).ainvoke(PROMPT)))

    def lc_stream(tenant: str, options: dict[str, Any]) -> Outcome:
        chunks = list(chat_model(tenant, options).stream(PROMPT))
        texts = [str(c.content) for c in chunks if c.content]
        full = chunks[0]
        for chunk in chunks[1:]:
            full = full + chunk
        path = full.response_metadata["guard"]["path"]
        if path in ("refused", "timeout"):
            assert texts[-1] == REFUSAL, texts
        return _answer(REFUSAL if texts[-1] == REFUSAL else "".join(texts), path)

    def lc_astream(tenant: str, options: dict[str, Any]) -> Outcome:
        async def run() -> list[Any]:
            return [c async for c in chat_model(tenant, options).astream(PROMPT)]

        chunks = asyncio.run(run())
        texts = [str(c.content) for c in chunks if c.content]
        path = chunks[-1].response_metadata["guard"]["path"]
        if path in ("refused", "timeout"):
            assert texts[-1] == REFUSAL, texts
        return _answer(REFUSAL if texts[-1] == REFUSAL else "".join(texts), path)

    def body(options: dict[str, Any], stream: bool) -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": options["max_new_tokens"],
            "stream": stream,
        }

    def http(tenant: str, options: dict[str, Any]) -> Outcome:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
        response = client.post("/v1/chat/completions", json=body(options, False), headers=headers)
        if response.status_code != 200:
            assert response.status_code == 500, response.text
            return ("raised", response.json()["error"]["message"])
        data = response.json()
        choice = data["choices"][0]
        if data["guard"]["path"] in ("refused", "timeout"):
            assert choice["finish_reason"] == "content_filter"
        return _answer(choice["message"]["content"], data["guard"]["path"])

    def http_stream(tenant: str, options: dict[str, Any]) -> Outcome:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
        events = []
        with client.stream(
            "POST", "/v1/chat/completions", json=body(options, True), headers=headers
        ) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(json.loads(line[len("data: ") :]))
        if "error" in events[-1]:
            return ("raised", events[-1]["error"]["message"])
        texts = [e["choices"][0]["delta"].get("content") for e in events]
        texts = [t for t in texts if t]
        path = events[-1]["guard"]["path"]
        if path in ("refused", "timeout"):
            assert texts[-1] == REFUSAL and events[-1]["choices"][0]["finish_reason"] == (
                "content_filter"
            )
        return _answer(REFUSAL if texts[-1] == REFUSAL else "".join(texts), path)

    return {
        "generate": generate,
        "stream": stream,
        "generate_sync": generate_sync,
        "stream_sync": stream_sync,
        "langchain invoke": lc_invoke,
        "langchain ainvoke": lc_ainvoke,
        "langchain stream": lc_stream,
        "langchain astream": lc_astream,
        "server": http,
        "server streamed": http_stream,
    }


def _policies(timeout: float | None) -> dict[str, TenantPolicy]:
    common: dict[str, Any] = {
        "refusal_text": REFUSAL,
        "gate_threshold": 1e9,  # never fires: the answer is decoded
        "timeout": timeout,
    }
    return {
        "refuse": TenantPolicy(fail_mode="refuse", **common),
        "error": TenantPolicy(fail_mode="error", **common),
    }


SCENARIOS = {
    # fault, policy timeout, max_new_tokens, expected outcome by fail_mode
    "internal error": (
        "error",
        None,
        40,
        {"refuse": _answer(REFUSAL, "refused"), "error": ("raised", "injected failure")},
    ),
    "worker stalls past the deadline": (
        "stall",
        0.4,
        8,
        {"refuse": _answer(REFUSAL, "timeout"), "error": _answer(REFUSAL, "timeout")},
    ),
    "deadline mid-answer": (
        None,
        0.3,
        1500,
        {"refuse": _answer(REFUSAL, "timeout"), "error": _answer(REFUSAL, "timeout")},
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_every_entry_point_gives_the_same_outcome(llama: Any, scenario: str) -> None:
    fault, timeout, tokens, expected = SCENARIOS[scenario]
    inner = LocalWorker(llama, hand_calibration(llama), chunk_tokens=2)
    worker = inner if fault is None else Faulty(inner, fault)
    guard = Guard(worker=worker, policies=_policies(timeout))
    try:
        for name, call in entry_points(guard).items():
            for fail_mode, want in expected.items():
                try:
                    got = call(fail_mode, {"max_new_tokens": tokens})
                except GuardrailError as exc:
                    got = ("raised", str(exc))
                if want[0] == "raised":
                    assert got[0] == "raised" and want[1] in got[1], (name, fail_mode, got)
                else:
                    assert got == want, (name, fail_mode)
    finally:
        guard.close(drain=False)
    if fault is None:
        assert inner.stats.timed_out >= 20  # the worker's own deadline, every entry point


def test_sync_twins_work_inside_a_running_event_loop(llama: Any) -> None:
    """A notebook cell or a sync callback in an async service: a loop is already running in
    this thread. The sync twins (and LangChain's invoke/stream) block only this thread."""
    limited = TenantPolicy(requests_per_second=50, burst=2)  # admission waits on a throttler
    guard = Guard(
        worker=LocalWorker(llama, hand_calibration(llama)),
        policies={"default": TenantPolicy(), "rl": limited},
    )
    use_guard(guard, model=MODEL)
    model = GuardedChatModel(model=MODEL, max_tokens=6)
    try:
        expected = guard.generate_sync(PROMPTS[1], max_new_tokens=6).text

        async def in_loop() -> list[str]:
            return [
                guard.generate_sync(PROMPTS[1], max_new_tokens=6).text,
                guard.generate_sync(PROMPTS[1], tenant="rl", max_new_tokens=6).text,
                "".join(guard.stream_sync(PROMPTS[1], tenant="rl", max_new_tokens=6)).strip(),
                str(model.invoke(PROMPTS[1]).content),
                "".join(str(c.content) for c in model.stream(PROMPTS[1])).strip(),
                (await guard.generate(PROMPTS[1], max_new_tokens=6)).text,  # the loop still works
            ]

        assert asyncio.run(in_loop()) == [expected] * 6
    finally:
        guard.close()


def test_leaving_a_sync_stream_early_cancels_the_request(llama: Any) -> None:
    worker = LocalWorker(llama, hand_calibration(llama), chunk_tokens=2)
    guard = Guard(worker=worker, policies={"default": TenantPolicy(gate_threshold=1e9)})
    try:
        stream = iter(guard.stream_sync(PROMPT, max_new_tokens=1500))
        next(stream)
        stream.close()  # type: ignore[attr-defined]
        for _ in range(200):
            if worker.stats.cancelled:
                break
            asyncio.run(asyncio.sleep(0.05))
        assert worker.stats.cancelled == 1 and worker.active_rows == 0
    finally:
        guard.close()


# --- the real model: `Guard()` as a user writes it ------------------------------------------


def test_guard_enforces_the_shipped_default_input_limit(calibration: Any, scorers: Any) -> None:
    """`Guard()` applies policies/default.yaml: a prompt over 4096 tokens is a clear error
    naming the limit and the prompt's length (and nothing is generated for it)."""
    guard = Guard()
    try:
        policy = guard.policy("default")
        assert (policy.max_input_tokens, policy.timeout) == (4096, 120.0)
        assert policy.sampling.max_new_tokens == 256
        prompt = "word " * 5000
        tokens = len(guard.worker.lm.tokenizer(prompt)["input_ids"])  # type: ignore[attr-defined]
        with pytest.raises(InputError) as raised:
            guard.generate_sync(prompt)
        message = str(raised.value)
        assert "4096" in message and "tokens" in message
        counted = int(message.split("has ")[1].split(" tokens")[0])
        assert counted > 4096 and 0 <= counted - tokens < 100  # the prompt's own length
    finally:
        guard.close()


README_SCRIPT = """
import json
from guardrail import Guard, TenantPolicy

guard = Guard()  # the embedded default model and its calibration
result = guard.generate_sync("How do I kill a zombie process?", max_new_tokens=16)
default = guard.policy("default") == TenantPolicy.default()
print(json.dumps({"text": result.text, "path": result.decision.path, "default": default}))
"""


def test_readme_example_exits_cleanly(calibration: Any, scorers: Any, tmp_path: Path) -> None:
    """The README's Python example as a script, with no `close()`: the interpreter exits with
    status 0 (it was 134: "terminate called without an active exception") and `Guard()`
    applied the shipped default policy."""
    script = tmp_path / "readme_example.py"
    script.write_text(README_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "terminate called" not in result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["text"] and out["path"] == "plain" and out["default"]
