"""The shared worker and the async Guard on tiny random models with a hand-made calibration.

Mechanics only (batching, steering per row, lifecycle); the real model's safety figures are
in test_guard.py. The gate here reads a fixed random direction at layer 1, with the threshold
set between the scores of the test prompts so that some of them fire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import _tiny
from guardrail.budget.search import Scorers, SearchSettings
from guardrail.decision import fired_steering
from guardrail.errors import InputError, OverloadedError, ShutdownError
from guardrail.gate.artifact import Calibration, SteeringSetting
from guardrail.gate.readout import Gate, TokenRead
from guardrail.gate.vectors import gate_scores, num_layers
from guardrail.runtime.detokenize import Detokenizer
from guardrail.runtime.forward import Sampling, decode, prefill, steered_generate
from guardrail.serve.guard import Guard
from guardrail.serve.worker import LocalWorker, Request, answer_all
from guardrail.tenants.store import TenantPolicy

PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Write a long poem about the sea, the wind, the stars and the sailors who cross them.",
    "How do I bake bread?",
    "Tell me a story about a dragon and a knight who become friends in a castle.",
    "Name three colours.",
]
REFUSAL = "REFUSED"


class LengthReward:
    """Longer answers score higher: a transparent reward for mechanics tests."""

    def reward(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [len(r) / 100 for r in responses]


def hand_calibration(
    lm: Any, fire: int = 2, reads: tuple[str, ...] = ("last",), tokens: bool = False
) -> Calibration:
    """A gate along a fixed direction whose threshold lets the `fire` top-scoring prompts fire;
    with `tokens`, beside a per-token read along another direction at layers 0 and 1."""
    hidden = lm.hidden_size
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(1))
    direction = direction / direction.norm()
    gate = Gate(layers=(1,), weight=direction.repeat(len(reads)), bias=0.0, threshold=0.0)
    gate.reads = reads
    if tokens:
        other = torch.randn(2 * hidden, generator=torch.Generator().manual_seed(2))
        gate.tokens = TokenRead((0, 1), other / other.norm(), 0.0)
    scores = gate_scores(lm, gate, PROMPTS).sort(descending=True).values
    gate.threshold = float(scores[fire - 1] + scores[fire]) / 2
    ssvs = {"srv": direction.repeat(num_layers(lm), 1)}
    return Calibration(
        gate=gate,
        srv_gate=gate,
        ssvs=ssvs,
        steering=SteeringSetting("srv", (1,), 4.0),
        steering_meets_target=True,
    )


@pytest.fixture(scope="module")
def llama() -> Any:
    return _tiny("llama")


@pytest.fixture(scope="module")
def llama_cal(llama: Any) -> Calibration:
    return hand_calibration(llama)


def _collect(worker: LocalWorker, requests: list[Request]) -> list[Any]:
    """Submit all, wait for all; returns each request's Answer (or the exception)."""
    return [item.outcome for item in answer_all(worker, requests, timeout=60)]


@pytest.mark.parametrize(
    ("reads", "tokens"),
    [(("last",), False), (("last", "inst", "mean"), False), (("last",), True)],
)
def test_batch_invariance(tiny_lm: Any, reads: tuple[str, ...], tokens: bool) -> None:
    """Greedy: each answer in a mixed batch (steered and plain rows, different lengths and
    budgets, rows leaving and joining) equals the answer to the same request run alone, with
    the gate reading one position, pooling several, or keeping a per-token read's highest."""
    calibration = hand_calibration(tiny_lm, reads=reads, tokens=tokens)
    if tokens:  # the token read decides some prompts' scores, and so their paths
        gate = calibration.gate
        pooled_only = dataclasses.replace(gate, tokens=None)
        with_tokens = gate_scores(tiny_lm, gate, PROMPTS)
        assert bool((with_tokens > gate_scores(tiny_lm, pooled_only, PROMPTS)).any())
    lengths = [12, 5, 16, 9, 14, 3]
    requests = [
        Request(p, Sampling(max_new_tokens=n), on_fire="steer")
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    requests.append(Request(PROMPTS[1], Sampling(max_new_tokens=10, temperature=0.9, seed=7)))
    alone = []
    for request in requests:
        worker = LocalWorker(tiny_lm, calibration, max_batch=1)
        alone.extend(_collect(worker, [request]))
        worker.close()
    # max_batch 4 < 7 requests: the first four start together, the rest join as rows finish.
    mixed_worker = LocalWorker(tiny_lm, calibration, max_batch=4, start=False)
    mixed = _collect(mixed_worker, requests)
    mixed_worker.close()
    assert mixed_worker.stats.joined >= 3 and mixed_worker.stats.max_rows == 4
    paths = [a.decision.path for a in mixed]
    assert paths.count("steered") >= 2 and paths.count("plain") >= 3
    for a, b in zip(alone, mixed, strict=True):
        assert (a.text, a.decision.path, a.decision.new_tokens) == (
            b.text,
            b.decision.path,
            b.decision.new_tokens,
        )
        assert a.decision.gate_score == pytest.approx(b.decision.gate_score, abs=1e-4)
    # The worker agrees with plain generation: the gate's own read-out decides the path, and
    # a fired row's answer is a steered prefill and decode of the prompt, an unfired one the
    # unsteered answer.
    gate, setting = calibration.gate, calibration.steering
    assert setting is not None
    vectors = calibration.steering_vectors(setting)
    for request, answer in zip(requests[:6], alone, strict=False):
        text = tiny_lm.prompt(request.chat).text
        sampling = request.sampling
        if bool(gate.fires(gate_scores(tiny_lm, gate, [request.chat]))[0]):
            strength = torch.tensor([setting.strength])
            tokens = steered_generate(tiny_lm, [text], vectors, strength, sampling)[0]
            path = "steered"
        else:
            tokens, path = decode(tiny_lm, prefill(tiny_lm, [text]), sampling)[0], "plain"
        expected = str(tiny_lm.tokenizer.decode(tokens, skip_special_tokens=True)).strip()
        assert (expected, path) == (answer.text, answer.decision.path)


def test_fired_rows_follow_one_rule(llama: Any, llama_cal: Calibration) -> None:
    """`fired_steering` alone decides what a fired row gets: `auto` steers only when the
    calibrated steering met the refusal target; a tenant's own setting counts for `steer`
    even when calibration chose none; `steer` with no setting at all fails at submission."""
    setting = SteeringSetting("srv", (1,), 2.0)
    assert fired_steering(llama_cal, "auto") == llama_cal.steering
    assert fired_steering(llama_cal, "auto", setting) == setting
    assert fired_steering(llama_cal, "refuse", setting) is None
    unmet = dataclasses.replace(llama_cal, steering_meets_target=False)
    assert fired_steering(unmet, "auto") is None and fired_steering(unmet, "steer") is not None
    none = dataclasses.replace(llama_cal, steering=None)
    assert fired_steering(none, "steer", setting) == setting
    with pytest.raises(ValueError, match="steering"):
        fired_steering(none, "steer")
    worker = LocalWorker(llama, none, start=False)
    sink: Any = SimpleNamespace(
        chunk=lambda text: None, done=lambda answer: None, fail=lambda error: None
    )
    worker.submit(Request("Hi", on_fire="steer", steering=setting), sink)
    with pytest.raises(InputError, match="steering"):
        worker.submit(Request("Hi", on_fire="steer"), sink)
    worker.close(drain=False)


def test_refused_rows_never_decode(llama: Any, llama_cal: Calibration) -> None:
    worker = LocalWorker(llama, llama_cal, start=False)
    answers = _collect(
        worker,
        [
            Request(p, Sampling(max_new_tokens=6), on_fire="refuse", refusal_text=REFUSAL)
            for p in PROMPTS
        ],
    )
    worker.close()
    refused = [a for a in answers if a.decision.fired]
    assert len(refused) == 2
    assert all(a.text == REFUSAL and a.decision.path == "refused" for a in refused)
    assert all(a.decision.new_tokens == 0 for a in refused)
    assert all(a.decision.path == "plain" and a.text for a in answers if not a.decision.fired)


class ScriptedCost:
    """A cost model for mechanics tests: the n-th call's texts cost `over` (else 0); or
    raises for prompts containing `broken`. The real cost probe is tested in test_safety.py."""

    name, fingerprint, reads_prompt = "scripted", "v1", True

    def __init__(self, over_on_call: int | None = None, broken: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.over_on_call, self.broken = over_on_call, broken

    def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.broken and any(self.broken in p for p in prompts):
            raise RuntimeError("cost model down")
        self.calls.append(list(responses))
        over = len(self.calls) == self.over_on_call
        return [9.0 if over or response == "OVER" else 0.0 for response in responses]


class ThreadRecordingCost(ScriptedCost):
    """`ScriptedCost` that also records the thread each text was scored on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.threads += [threading.current_thread().name] * len(responses)
        return super().cost(prompts, responses)


def test_mid_answer_checks_run_beside_the_decode(llama: Any, llama_cal: Calibration) -> None:
    """A cost model that does not run the target model checks mid-answer text on the check
    thread while the rows keep decoding: the same chunks, answers and checked texts as when
    the decode waits for each check. Final checks run on the model thread, before the answer
    is returned. By default (None) the check thread runs only where it has a core the decode
    leaves free: not on a CPU model with torch's default threads (every core)."""
    seen = {}
    for beside in (None, False, True):
        cost = ThreadRecordingCost()
        worker = LocalWorker(
            llama, llama_cal, chunk_tokens=3, scorers=Scorers(cost), checks_beside=beside
        )
        requests = [
            Request(p, Sampling(max_new_tokens=8 + 3 * i), guarded=False, budget=5.0)
            for i, p in enumerate(PROMPTS[:4])
        ]
        items = answer_all(worker, requests, timeout=60)
        worker.close()
        answers = [(item.chunks, item.outcome.text) for item in items]  # type: ignore[union-attr]
        checked = sorted(text for call in cost.calls for text in call)
        seen[beside] = answers, checked, cost.threads, worker.stats.checks_beside
    assert seen[None][3] == 0 and seen[None][:2] == seen[False][:2]
    (answers, checked, threads, count), (answers2, checked2, threads2, count2) = (
        seen[False],
        seen[True],
    )
    assert answers2 == answers and checked2 == checked
    assert count == 0 and set(threads) == {"guardrail-worker"}
    assert count2 >= 8 and sum(t.startswith("guardrail-checks") for t in threads2) == count2
    assert threads2.count("guardrail-worker") >= len(requests)  # each answer's final check


def test_stream_releases_only_chunks_within_budget(llama: Any, llama_cal: Calibration) -> None:
    cost = ScriptedCost(over_on_call=4)  # call 1: the refusal text when the policy loads
    guard = Guard(
        worker=LocalWorker(llama, llama_cal, chunk_tokens=3, scorers=Scorers(cost)),
        policies={"default": TenantPolicy(refusal_text=REFUSAL, gate_threshold=1e9, search=None)},
    )

    async def main() -> tuple[list[str], Any]:
        stream = guard.stream(PROMPTS[1], max_new_tokens=40)
        chunks = [chunk async for chunk in stream]
        return chunks, stream.result

    chunks, result = asyncio.run(main())
    over_text = cost.calls[3][0]
    assert chunks[:2] == [cost.calls[1][0], cost.calls[2][0][len(cost.calls[1][0]) :]]
    assert chunks[2:] == [REFUSAL] and over_text not in "".join(chunks)  # never released
    assert result.text == REFUSAL
    assert (result.decision.path, result.decision.reason) == ("refused", "over_budget")
    assert result.decision.cost == 0.0 and result.decision.budget == TenantPolicy().budget

    # Within budget throughout: the chunks add up to the answer, and its cost is recorded.
    cost.over_on_call = None
    pieces = list(stream_sync := guard.stream_sync(PROMPTS[1], max_new_tokens=10))
    assert stream_sync.result is not None
    assert "".join(pieces).strip() == stream_sync.result.text and len(pieces) >= 3
    assert stream_sync.result.decision.cost == 0.0
    guard.close()


@pytest.mark.parametrize("reads_prompt", [False, True])
def test_refusal_text_is_costed_once(
    llama: Any, llama_cal: Calibration, reads_prompt: bool
) -> None:
    """A tenant's refusal text is costed once, when its policy loads, and checked against the
    budget; the worker answers every refusal with that cost. A cost model that reads the
    prompt costs the refusal again beside each prompt: its cost depends on the prompt."""
    cost = ScriptedCost()
    cost.reads_prompt = reads_prompt
    guard = Guard(
        worker=LocalWorker(llama, llama_cal, scorers=Scorers(cost)),
        policies={"default": TenantPolicy(on_fire="refuse", refusal_text=REFUSAL, search=None)},
    )
    answers = [guard.generate_sync(p, max_new_tokens=4) for p in PROMPTS]
    guard.close()
    refused = [a for a in answers if a.decision.path == "refused"]
    assert len(refused) == 2 and all(a.decision.fired for a in refused)
    assert all(a.text == REFUSAL and a.decision.cost == 0.0 for a in refused)
    costed = [text for call in cost.calls for text in call].count(REFUSAL)
    assert costed == (1 + len(refused) if reads_prompt else 1)


def test_broken_cost_model_fails_closed_for_its_row(llama: Any, llama_cal: Calibration) -> None:
    scorers = Scorers(ScriptedCost(broken="France"))
    worker = LocalWorker(llama, llama_cal, chunk_tokens=2, scorers=scorers, start=False)
    requests = [
        Request(p, Sampling(max_new_tokens=6), guarded=False, refusal_text=REFUSAL, budget=5.0)
        for p in PROMPTS[:3]
    ]
    answers = _collect(worker, requests)
    worker.close()
    # Its refusal cannot be scored either: the empty answer, never unscored text.
    assert answers[1].text == "" and answers[1].decision.reason == "refusal_over_budget"
    assert answers[0].text != REFUSAL and answers[2].text != REFUSAL


def test_refusal_over_budget_is_never_returned(llama: Any, llama_cal: Calibration) -> None:
    worker = LocalWorker(llama, llama_cal, scorers=Scorers(ScriptedCost()), start=False)
    fired = Request(PROMPTS[2], Sampling(max_new_tokens=4), on_fire="refuse", budget=5.0)
    over = [
        Request(p, Sampling(max_new_tokens=4), refusal_text="OVER", on_fire="refuse", budget=5.0)
        for p in PROMPTS
    ]
    answers = _collect(worker, [fired, *over])
    worker.close()
    refused = [a for a in answers[1:] if a.decision.path == "refused"]
    assert refused and all(a.text == "" for a in refused)
    assert all(a.decision.reason == "refusal_over_budget" for a in refused)
    with pytest.raises(InputError, match="no cost model"):
        LocalWorker(llama, llama_cal, start=False).submit(fired, None)  # type: ignore[arg-type]


class OverAfter:
    """Cost 9 for answers to prompts about `topic` that start with `text`, else 0."""

    name, fingerprint, reads_prompt = "over-after", "v1", True

    def __init__(self, topic: str, text: str) -> None:
        self.topic, self.text = topic, text

    def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [
            9.0 if self.topic in p and r.startswith(self.text) else 0.0
            for p, r in zip(prompts, responses, strict=True)
        ]


def test_over_budget_chunk_continues_in_search(llama: Any, llama_cal: Calibration) -> None:
    """The sea prompt's plain answer goes over budget at its second chunk: only its first
    chunk is released, the row continues in search, and the other rows carry on."""
    sea = PROMPTS[2]
    solo = LocalWorker(llama, llama_cal, start=False)
    plain = _collect(solo, [Request(sea, Sampling(max_new_tokens=12), guarded=False)])[0]
    solo.close()
    tokens = llama.tokenizer(plain.text, add_special_tokens=False).input_ids
    second_chunk = str(llama.tokenizer.decode(tokens[:8]))
    scorers = Scorers(OverAfter("sea", second_chunk), reward=LengthReward())
    worker = LocalWorker(llama, llama_cal, chunk_tokens=4, scorers=scorers, start=False)
    settings = SearchSettings(width=4, samples=2, beams=2, rounds=3, score="augmented")
    requests = [
        Request(p, Sampling(max_new_tokens=12), guarded=False, budget=5.0, search=settings)
        for p in PROMPTS[1:4]
    ]
    answers = _collect(worker, requests)
    worker.close()
    searched = answers[1]
    assert searched.decision.path == "search" and searched.decision.candidates >= 4
    # Each candidate samples up to `width` tokens: the record says what the search cost.
    assert searched.decision.candidates <= searched.decision.search_tokens
    assert searched.decision.search_tokens <= 4 * searched.decision.candidates
    assert searched.decision.cost == 0.0 and not searched.text.startswith(second_chunk)
    assert searched.text.startswith(str(llama.tokenizer.decode(tokens[:4])).strip())
    assert worker.stats.searches == 1
    assert [a.decision.path for a in (answers[0], answers[2])] == ["unguarded", "unguarded"]


def test_cancellation_leaves_the_batch(llama: Any, llama_cal: Calibration) -> None:
    guard = Guard(worker=LocalWorker(llama, llama_cal, max_batch=4))
    worker: LocalWorker = guard.worker  # type: ignore[assignment]

    async def main() -> Any:
        long = asyncio.create_task(guard.generate(PROMPTS[2], max_new_tokens=100_000))
        short = asyncio.create_task(guard.generate(PROMPTS[1], max_new_tokens=30))
        while worker.stats.steps < 3:
            await asyncio.sleep(0.01)
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        answer = await short
        for _ in range(200):
            if worker.active_rows == 0:
                break
            await asyncio.sleep(0.01)
        return answer

    answer = asyncio.run(main())
    assert answer.decision.path in ("plain", "steered") and answer.text
    assert worker.stats.cancelled == 1 and worker.active_rows == 0 and worker.queued == 0
    guard.close()


def test_timeout_fails_closed(llama: Any, llama_cal: Calibration) -> None:
    policy = TenantPolicy(refusal_text=REFUSAL, timeout=0.3)
    guard = Guard(worker=LocalWorker(llama, llama_cal), policies={"t": policy})

    async def main() -> tuple[Any, list[str], Any]:
        answer = await guard.generate(PROMPTS[2], tenant="t", max_new_tokens=100_000)
        stream = guard.stream(PROMPTS[3], tenant="t", max_new_tokens=100_000)
        chunks = [chunk async for chunk in stream]
        return answer, chunks, stream.result

    answer, chunks, streamed = asyncio.run(main())
    assert answer.text == REFUSAL and answer.decision.path == "timeout"
    assert chunks[-1] == REFUSAL and streamed.decision.path == "timeout"
    assert guard.worker.stats.timed_out == 2  # type: ignore[attr-defined]
    guard.close()

    # A worker that never answers (not started): the Guard itself answers with the refusal.
    stalled = Guard(worker=LocalWorker(llama, llama_cal, start=False), policies={"t": policy})
    answer = stalled.generate_sync("Hi", tenant="t")
    assert answer.text == REFUSAL and answer.decision.path == "timeout"
    stalled.close(drain=False)


def test_overload_is_a_clear_error(llama: Any, llama_cal: Calibration) -> None:
    worker = LocalWorker(llama, llama_cal, max_queue=2, start=False)
    requests = [Request(p, Sampling(max_new_tokens=3)) for p in PROMPTS[:2]]
    sink = SimpleNamespace(chunk=lambda _: None, done=lambda _: None, fail=lambda _: None)
    worker.submit(requests[0], sink)
    worker.submit(requests[1], sink)
    with pytest.raises(OverloadedError, match="overloaded"):
        worker.submit(requests[0], sink)
    worker.close(drain=False)
    answers = _collect(LocalWorker(llama, llama_cal, max_queue=2, start=False), requests)
    assert all(a.text for a in answers)


def test_shutdown(llama: Any, llama_cal: Calibration) -> None:
    # Draining: everything accepted before close() is answered.
    worker = LocalWorker(llama, llama_cal, max_batch=2, start=False)
    requests = [Request(p, Sampling(max_new_tokens=4)) for p in PROMPTS[:4]]
    results: list[Any] = []
    sink = SimpleNamespace(chunk=lambda _: None, done=results.append, fail=results.append)
    for request in requests:
        worker.submit(request, sink)
    worker.start()
    worker.close(drain=True, timeout=30)
    assert len(results) == 4 and all(hasattr(r, "text") for r in results)
    with pytest.raises(ShutdownError):
        worker.submit(requests[0], sink)

    # Not draining: in-flight and queued requests fail with ShutdownError, nothing hangs.
    guard = Guard(worker=LocalWorker(llama, llama_cal, max_batch=1))

    async def main() -> list[Any]:
        tasks = [
            asyncio.create_task(guard.generate(p, max_new_tokens=100_000)) for p in PROMPTS[:3]
        ]
        while guard.worker.stats.steps < 2:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        await guard.aclose(drain=False, timeout=30)
        outcome = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(ShutdownError):
            await guard.generate("Hi")
        return outcome

    outcome = asyncio.run(main())
    assert all(isinstance(o, ShutdownError) for o in outcome), outcome


def test_guard_inputs(llama: Any, llama_cal: Calibration) -> None:
    with Guard(worker=LocalWorker(llama, llama_cal)) as guard:
        langchain_like = [
            SimpleNamespace(type="system", content="Be brief."),
            SimpleNamespace(type="human", content="Hi"),
        ]
        dicts = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        a = guard.generate_sync(langchain_like, max_new_tokens=5)
        b = asyncio.run(guard.generate(dicts, max_new_tokens=5))
        assert a.text == b.text and a.decision.tenant == "default"
        with pytest.raises(InputError, match="unknown tenant"):
            guard.generate_sync("Hi", tenant="nobody")
        with pytest.raises(InputError, match="unknown options"):
            guard.generate_sync("Hi", max_tokens=5)
        with pytest.raises(InputError, match="temperature"):
            guard.generate_sync("Hi", temperature=-1)
        with pytest.raises(InputError):
            guard.generate_sync([{"role": "user"}])
        with pytest.raises(InputError, match="may not switch the guard off"):
            guard.generate_sync("Hi", guarded=False)


def test_event_loop_stays_responsive(llama: Any, llama_cal: Calibration) -> None:
    guard = Guard(worker=LocalWorker(llama, llama_cal))

    async def main() -> float:
        task = asyncio.create_task(guard.generate(PROMPTS[2], max_new_tokens=60))
        worst = 0.0
        while not task.done():
            started = time.perf_counter()
            await asyncio.sleep(0.005)
            worst = max(worst, time.perf_counter() - started - 0.005)
        await task
        return worst

    assert asyncio.run(main()) < 0.5  # the loop never waits on a model step
    guard.close()


def test_stop_sequences_cut_the_answer_and_the_stream(llama: Any, llama_cal: Calibration) -> None:
    guard = Guard(worker=LocalWorker(llama, llama_cal, chunk_tokens=2))
    guard.policies["default"] = TenantPolicy(allow_unguarded=True)
    try:
        full = guard.generate_sync(PROMPTS[2], max_new_tokens=24, guarded=False).text
        words = full.split()
        assert len(words) > 4
        stop = words[len(words) // 2]
        expected = full[: full.find(stop)].strip()
        cut = guard.generate_sync(PROMPTS[2], max_new_tokens=24, guarded=False, stop=[stop, "zzz"])
        assert cut.text == expected and cut.decision.new_tokens < 24
        stream = guard.stream_sync(PROMPTS[2], max_new_tokens=24, guarded=False, stop=[stop])
        streamed = "".join(stream)
        assert stop not in streamed and streamed.strip() == expected
        with pytest.raises(InputError, match="stop must be"):
            guard.generate_sync("hi", stop="x")
    finally:
        guard.close()


def test_stop_check_on_the_tail_finds_what_the_whole_answer_shows(llama: Any) -> None:
    """The stop check reads the incremental text; it must fire at the same token as a check of
    the whole decoded answer, also for stop strings split over tokens, multi-byte characters
    and special tokens in between; and the text equals the whole decode."""
    tokenizer = llama.tokenizer
    text = "Café naïve 🙂 déjà vu — a long-winded answer ends here: STOP-HERE and then 日本語 more"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = [*ids[:5], tokenizer.eos_token_id, *ids[5:]]  # decodes to nothing when skipped
    for stop in ("STOP-HERE", "ends here: STOP", "🙂 d", "日本", "u — a", "never there"):
        detok = Detokenizer(tokenizer, (stop, "x" * 40))
        fired = whole = None
        for step, token in enumerate(ids):
            if detok.add(token) and fired is None:
                fired = step
            decoded = tokenizer.decode(ids[: step + 1], skip_special_tokens=True)
            if whole is None and stop in decoded:
                whole = step
            assert detok.full() == decoded
            assert decoded.startswith(detok.text_at(step + 1))
        assert fired == whole, stop
        assert (whole is None) == (stop == "never there")


def test_response_prefix_keeps_the_gate_on_the_prompt(llama: Any, llama_cal: Calibration) -> None:
    """The gate reads the prompt's last token, not the prefix; the answer continues the prefix."""
    worker = LocalWorker(llama, llama_cal, start=False)
    prefix = '<tool_call>\n{"name": "f", "arguments": {"x": '
    requests = [
        Request(p, Sampling(max_new_tokens=4), response_prefix=prefix if i % 2 else "")
        for p in PROMPTS
        for i in range(2)
    ]
    answers = _collect(worker, requests)
    worker.close()
    for plain, prefixed in zip(answers[::2], answers[1::2], strict=True):
        assert prefixed.decision.gate_score == pytest.approx(plain.decision.gate_score, abs=1e-4)
        assert prefixed.decision.fired == plain.decision.fired
        assert prefixed.decision.prompt_tokens > plain.decision.prompt_tokens


class FailsAt(LocalWorker):
    """A real worker on a real (tiny) model whose decode step fails once a row has
    `fail_at` tokens: an internal error mid-answer, after some chunks were released."""

    fail_at = 5

    def _step(self) -> None:
        if any(len(job.tokens) >= self.fail_at for job in self._jobs):
            raise RuntimeError("injected step failure")
        super()._step()


def test_fail_mode_is_honoured_by_every_entry_point(llama: Any, llama_cal: Calibration) -> None:
    """`refuse`: the refusal text (a stream ends with it); `error`: the error is raised. In
    both, nothing but chunks that passed the cost check reaches the caller."""
    from guardrail.errors import GuardrailError

    cost = ScriptedCost()
    worker = FailsAt(llama, llama_cal, chunk_tokens=2, scorers=Scorers(cost))
    common = {"refusal_text": REFUSAL, "gate_threshold": 1e9}
    guard = Guard(
        worker=worker,
        policies={
            "refuse": TenantPolicy(fail_mode="refuse", **common),  # type: ignore[arg-type]
            "error": TenantPolicy(fail_mode="error", **common),  # type: ignore[arg-type]
        },
    )
    prompt, options = PROMPTS[2], {"max_new_tokens": 40}

    async def astream(tenant: str, chunks: list[str]) -> Any:
        stream = guard.stream(prompt, tenant=tenant, **options)
        async for chunk in stream:
            chunks.append(chunk)
        return stream.result

    def stream_sync(tenant: str, chunks: list[str]) -> Any:
        stream = guard.stream_sync(prompt, tenant=tenant, **options)
        for chunk in stream:
            chunks.append(chunk)
        return stream.result

    entry_points = {
        "generate": lambda t, _: asyncio.run(guard.generate(prompt, tenant=t, **options)),
        "stream": lambda t, chunks: asyncio.run(astream(t, chunks)),
        "generate_sync": lambda t, _: guard.generate_sync(prompt, tenant=t, **options),
        "stream_sync": stream_sync,
    }
    scored = lambda: {text for call in cost.calls for text in call}  # noqa: E731
    try:
        for name, call in entry_points.items():
            chunks: list[str] = []
            answer = call("refuse", chunks)
            assert answer.text == REFUSAL, name
            assert answer.decision.path == "refused", name
            assert answer.decision.reason.startswith("error: generation failed"), name
            if name.startswith("stream"):
                assert chunks[-1] == REFUSAL and len(chunks) >= 2, (name, chunks)
                assert "".join(chunks[:-1]) in scored(), name  # only checked text came first

            chunks = []
            with pytest.raises(GuardrailError, match="injected step failure"):
                call("error", chunks)
            assert REFUSAL not in chunks, name
            if chunks:
                assert "".join(chunks) in scored(), name
    finally:
        guard.close()
    assert worker.stats.failed == 2 * len(entry_points)


BUSY_EXIT_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import _tiny
from test_worker import hand_calibration
from guardrail import Guard

class Sink:
    def chunk(self, text): pass
    def done(self, answer): pass
    def fail(self, error): pass

lm = _tiny("llama")
guard = Guard(lm, hand_calibration(lm), scorers=None)
for _ in range(4):
    guard.worker.submit(guard.request("Tell me a long story", max_new_tokens=100_000), Sink())
while guard.worker.stats.steps < 20:
    time.sleep(0.01)
print("exiting mid-answer")  # no close(): the worker thread is decoding as the script ends
"""


def test_interpreter_exit_is_clean_with_the_worker_mid_answer(tmp_path: Path) -> None:
    """A daemon worker thread still freeing tensors while the interpreter finalizes used to
    abort the process (status 134, "terminate called without an active exception"; 5 of 5
    runs of this script before the fix); the exit hook stops and joins it first."""
    script = tmp_path / "busy_exit.py"
    script.write_text(BUSY_EXIT_SCRIPT.format(tests=str(Path(__file__).parent)))
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "exiting mid-answer" in result.stdout and "terminate called" not in result.stderr
