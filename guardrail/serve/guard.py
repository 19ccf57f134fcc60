"""`Guard`: the async entry point, with sync twins for scripts.

    guard = Guard()                       # the embedded default model and its calibration
    result = await guard.generate([{"role": "user", "content": "Hi"}], max_new_tokens=64)
    result.text, result.decision.path
    async for chunk in guard.stream("Tell me a story"):
        print(chunk, end="")

The event loop never waits on the model: requests go to a `Worker` (a thread owning the model)
and come back through `loop.call_soon_threadsafe`. The sync twins (`generate_sync`,
`stream_sync`) use the same worker through thread-safe queues, so a script and an async
service share one code path; they also work inside a running event loop (a notebook cell),
blocking it until the answer is done. Deadlines fail closed: when one passes, the answer is
the tenant's refusal text with path "timeout", never unguarded text. Internal errors follow
the tenant's `fail_mode` at every entry point: `refuse` answers with the refusal text (a
stream ends with it), `error` raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from asyncio_throttle.throttler import Throttler

from guardrail.decision import Answer, Decision
from guardrail.errors import CalibrationError, InputError, OverloadedError, ShutdownError
from guardrail.gate.artifact import Calibration, SteeringSetting
from guardrail.runtime.forward import Sampling
from guardrail.runtime.model import LanguageModel, Message
from guardrail.serve.worker import LocalWorker, Request, Ticket, Worker
from guardrail.tenants.schema import PolicyError, Problem
from guardrail.tenants.store import PolicyStore, TenantPolicy, UnknownTenantError

GuardResult = Answer  # `.text` and `.decision` (the decision record)

T = TypeVar("T")

# Slack the worker gets past a deadline to answer "timeout" itself (it notices between
# decode steps) before the Guard answers on its behalf.
_DEADLINE_GRACE_S = 0.25

_LANGCHAIN_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}
_OVERRIDES = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "timeout",
        "guarded",
        "stop",
        "response_prefix",
    }
)


def to_messages(messages: Any) -> list[Message] | str:
    """Accept a string, role/content dicts, or LangChain messages (anything with `.type`)."""
    if isinstance(messages, str):
        if not messages.strip():
            raise InputError("the prompt is empty")
        return messages
    if not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty string or list of messages")
    out: list[Message] = []
    for i, message in enumerate(messages):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        else:
            kind = getattr(message, "type", None)
            role, content = _LANGCHAIN_ROLES.get(str(kind), kind), getattr(message, "content", None)
        if not isinstance(role, str) or not isinstance(content, str):
            raise InputError(f"message {i} needs a string role and string content")
        out.append({"role": role, "content": content})
    return out


class _AsyncSink:
    """Moves worker callbacks onto the event loop; a closed loop just drops them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def _put(self, item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    def chunk(self, text: str) -> None:
        self._put(("chunk", text))

    def done(self, answer: Answer) -> None:
        self._put(("done", answer))

    def fail(self, error: BaseException) -> None:
        self._put(("error", error))


class _ThreadSink:
    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()

    def chunk(self, text: str) -> None:
        self.items.put(("chunk", text))

    def done(self, answer: Answer) -> None:
        self.items.put(("done", answer))

    def fail(self, error: BaseException) -> None:
        self.items.put(("error", error))


class GuardStream:
    """Async iterator over released text chunks; `.result` holds the answer once it ends.

    Leaving early (`aclose()`, `async with`, or cancelling the consuming task) cancels the
    request, so its row leaves the batch at the next step.
    """

    def __init__(self, guard: Guard, request: Request, timeout_at: float | None) -> None:
        self._guard = guard
        self._request = request
        self._timeout_at = timeout_at
        self._sink: _AsyncSink | None = None
        self._ticket: Ticket | None = None
        self._closed = False
        self.result: Answer | None = None

    def __aiter__(self) -> GuardStream:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        if self._sink is None:
            if not await self._guard._admit(self._request):
                self._closed = True
                self.result = _timeout_answer(self._request)
                return self.result.text
            self._sink = _AsyncSink(asyncio.get_running_loop())
            self._ticket = self._guard.worker.submit(self._request, self._sink)
        try:
            kind, value = await _next_item(self._sink.items, self._timeout_at)
        except TimeoutError:
            self._cancel()
            self.result = _timeout_answer(self._request)
            return self.result.text
        except BaseException:
            self._cancel()
            raise
        if kind == "chunk":
            return str(value)
        self._closed = True
        if kind == "done":
            self.result = value
            raise StopAsyncIteration
        self.result = self._guard._failed(self._request, value)  # or raises
        return self.result.text

    def _cancel(self) -> None:
        self._closed = True
        if self._ticket is not None:
            self._ticket.cancel()

    async def aclose(self) -> None:
        if not self._closed:
            self._cancel()

    def __del__(self) -> None:  # abandoned mid-stream: free the row
        if not self._closed and self._ticket is not None:
            self._ticket.cancel()

    async def __aenter__(self) -> GuardStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Guard:
    """Resolve the tenant's policy, hand the request to the worker, fail closed on deadline."""

    def __init__(
        self,
        lm: LanguageModel | None = None,
        calibration: Calibration | None = None,
        *,
        worker: Worker | None = None,
        policies: PolicyStore | Mapping[str, TenantPolicy] | str | Path | None = None,
        redis_url: str | None = None,
        cost_model: str | None = None,
        **worker_options: Any,
    ) -> None:
        """With no arguments: the embedded default model and its (stored or new) calibration.

        `policies`: a folder of tenant policy files (or a `PolicyStore` over one, reloaded on
        change), or tenant policies in code; default: the shipped `default` policy only
        (`policies/default.yaml`: 120 s deadline, 4096 input tokens, 256 new tokens).
        `redis_url` (default: `GUARDRAIL_REDIS_URL`): where calibration artifacts and cost
        scores are shared. `cost_model`: `minilm` (the default), `latent`, or a
        sequence-classification model (see `load_scorers`). `worker_options` go to
        `LocalWorker` (max_batch, max_wait,
        max_queue, chunk_tokens, scorers, join); without `scorers` the calibrated cost model,
        reward and critic are loaded (or calibrated once).
        """
        if worker is None:
            if lm is None:
                from guardrail.runtime.model import load_model

                lm = load_model()
            if calibration is None:
                from guardrail.calibrate.store import default_store, load_or_calibrate

                calibration = load_or_calibrate(lm, store=default_store(redis_url), progress=False)
            if "scorers" not in worker_options:
                from guardrail.calibrate.store import load_scorers

                worker_options["scorers"] = load_scorers(
                    lm, calibration, redis_url=redis_url, cost_model=cost_model
                )
            worker = LocalWorker(lm, calibration, **worker_options)
        self.worker = worker
        if isinstance(policies, (str, Path)):
            policies = PolicyStore(policies)
        self.store = policies if isinstance(policies, PolicyStore) else None
        self.policies: dict[str, TenantPolicy] = {}
        if not isinstance(policies, PolicyStore):
            self.policies = dict(policies or {"default": TenantPolicy.default()})
        self._throttlers: dict[str, tuple[TenantPolicy, Throttler | None]] = {}
        self._refusal_costs: dict[str, float] = {}

    def policy(self, tenant: str) -> TenantPolicy:
        """The tenant's policy in force now; `UnknownTenantError` if it has none."""
        if self.store is not None:
            return TenantPolicy.from_policy(self.store.get(tenant))
        policy = self.policies.get(tenant)
        if policy is None:
            known = ", ".join(sorted(self.policies))
            raise UnknownTenantError(f"unknown tenant {tenant!r} (known: {known})")
        return policy

    def request(self, messages: Any, tenant: str = "default", **overrides: Any) -> Request:
        """Build the worker request; errors in the input raise `InputError` right here."""
        policy = self.policy(tenant)
        unknown = set(overrides) - _OVERRIDES
        if unknown:
            raise InputError(f"unknown options {sorted(unknown)}; known: {sorted(_OVERRIDES)}")
        base = policy.sampling
        try:
            sampling = Sampling(
                max_new_tokens=overrides.get("max_new_tokens", base.max_new_tokens),
                temperature=overrides.get("temperature", base.temperature),
                top_p=overrides.get("top_p", base.top_p),
                seed=overrides.get("seed", base.seed),
            )
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        guarded = bool(overrides.get("guarded", True))
        if not guarded and not policy.allow_unguarded:
            raise InputError(f"tenant {tenant!r} may not switch the guard off")
        timeout = overrides.get("timeout", policy.timeout)
        stop = overrides.get("stop") or ()
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"stop must be a list of non-empty strings, got {stop!r}")
        prefix = overrides.get("response_prefix", "")
        if not isinstance(prefix, str):
            raise InputError(f"response_prefix must be a string, got {type(prefix).__name__}")
        # The guard off: no cost check. The refusal text's checked cost goes with the request.
        budget, refusal_cost = self._budget(tenant, policy) if guarded else (None, None)
        return Request(
            chat=to_messages(messages),
            sampling=sampling,
            guarded=guarded,
            on_fire=policy.on_fire,
            refusal_text=policy.refusal_text,
            deadline=None if timeout is None else time.monotonic() + float(timeout),
            tenant=tenant,
            gate_threshold=self._gate_threshold(policy),
            steering=self._steering(policy),
            max_input_tokens=policy.max_input_tokens,
            response_prefix=prefix,
            stop=tuple(stop),
            budget=budget,
            refusal_cost=refusal_cost,
            search=policy.search if budget is not None else None,
            cost_model=policy.cost_model if budget is not None else None,
        )

    def _budget(self, tenant: str, policy: TenantPolicy) -> tuple[float | None, float | None]:
        """The tenant's budget when the worker has a cost model (None: no cost check), and
        its refusal text's cost, costed once here: it must be within the budget, as the text
        every fail-closed path answers with, and the worker answers a refusal with it."""
        scorers = getattr(self.worker, "scorers", None)
        if scorers is None:
            return None, None
        text = policy.refusal_text
        try:
            cost = scorers.for_cost(policy.cost_model).cost
        except InputError as exc:
            raise PolicyError(
                [Problem(f"tenant {tenant!r}", None, "cost_model", str(exc))]
            ) from None
        key = f"{policy.cost_model}\x00{text}"
        if key not in self._refusal_costs:
            self._refusal_costs[key] = float(cost.cost([""], [text])[0])
        if self._refusal_costs[key] > policy.budget:
            message = (
                f"costs {self._refusal_costs[key]:.2f} under the cost model, over the "
                f"budget {policy.budget}: write a plainer refusal or raise the budget"
            )
            raise PolicyError([Problem(f"tenant {tenant!r}", None, "refusal_text", message)])
        return policy.budget, self._refusal_costs[key]

    def _calibration(self, needs: str) -> Calibration:
        calibration = getattr(self.worker, "calibration", None)
        if not isinstance(calibration, Calibration):
            raise CalibrationError(f"{needs} needs a calibrated worker")
        return calibration

    def _gate_threshold(self, policy: TenantPolicy) -> float | None:
        if policy.gate_threshold is not None or policy.gate_target_fpr is None:
            return policy.gate_threshold
        return self._calibration("gate.target_fpr").threshold_at(policy.gate_target_fpr)

    def _steering(self, policy: TenantPolicy) -> SteeringSetting | None:
        """The tenant's steering setting, its `auto` parts from calibration; None: all auto."""
        given = (policy.steering_source, policy.steering_layers, policy.steering_strength)
        if given == (None, None, None):
            return None
        calibration = self._calibration("a tenant's steering setting")
        base = calibration.steering
        if base is None and None in given:
            raise CalibrationError(
                "calibration chose no steering setting: a tenant's steering needs source, "
                "layers and strength"
            )
        fallback = base or SteeringSetting("", (), 0.0)  # all three given when no base
        strength = policy.steering_strength
        setting = SteeringSetting(
            policy.steering_source or fallback.source,
            policy.steering_layers or fallback.layers,
            fallback.strength if strength is None else strength,
        )
        calibration.steering_vectors(setting)  # unknown source or layer: an error here
        return setting

    def _throttler(self, tenant: str) -> Throttler | None:
        """One throttler per tenant, renewed when the tenant's policy changes."""
        policy = self.policy(tenant)
        held = self._throttlers.get(tenant)
        if held is None or held[0] != policy:
            held = (policy, policy.throttler())
            self._throttlers[tenant] = held
        return held[1]

    async def _admit(self, request: Request) -> bool:
        """Wait for the tenant's rate limit; False if the deadline passed while waiting."""
        throttler = self._throttler(request.tenant)
        if throttler is None:
            return True
        left = None if request.deadline is None else request.deadline - time.monotonic()
        try:
            await asyncio.wait_for(throttler.acquire(), left)  # type: ignore[no-untyped-call]
        except asyncio.TimeoutError:
            return False
        return True

    async def generate(self, messages: Any, tenant: str = "default", **overrides: Any) -> Answer:
        """The answer and its decision record; cancelling the caller cancels the request."""
        request = self.request(messages, tenant, **overrides)
        if not await self._admit(request):
            return _timeout_answer(request)
        sink = _AsyncSink(asyncio.get_running_loop())
        ticket = self.worker.submit(request, sink)
        timeout_at = _timeout_at(request)
        try:
            while True:
                kind, value = await _next_item(sink.items, timeout_at)
                if kind == "done":
                    return value  # type: ignore[no-any-return]
                if kind == "error":
                    return self._failed(request, value)
        except TimeoutError:
            ticket.cancel()
            return _timeout_answer(request)
        except BaseException:
            ticket.cancel()
            raise

    def _admit_sync(self, request: Request) -> bool:
        """`_admit` for the sync twins; no event loop at all for a tenant without a limit."""
        if self._throttler(request.tenant) is None:
            return True
        return _run_sync(self._admit(request))

    def _failed(self, request: Request, error: BaseException) -> Answer:
        """An internal error: the refusal text under `fail_mode: refuse`, else raise it.
        Every entry point (generate, streams, the sync twins) ends up here, so they agree."""
        if isinstance(error, (InputError, OverloadedError, ShutdownError, CancelledError)):
            raise _error(error)
        if self.policy(request.tenant).fail_mode == "error":
            raise _error(error)
        return _closed_answer(request, "refused", f"error: {error}")

    def stream(self, messages: Any, tenant: str = "default", **overrides: Any) -> GuardStream:
        """Released text chunks, each after it passed the chunk check (at most one held back)."""
        request = self.request(messages, tenant, **overrides)
        return GuardStream(self, request, _timeout_at(request))

    def generate_sync(self, messages: Any, tenant: str = "default", **overrides: Any) -> Answer:
        """`generate` for scripts: blocks the calling thread. Inside a running event loop (a
        notebook cell, a sync callback) it works too, but blocks that loop meanwhile."""
        for _ in (stream := self.stream_sync(messages, tenant, **overrides)):
            pass
        assert stream.result is not None
        return stream.result

    def stream_sync(
        self, messages: Any, tenant: str = "default", **overrides: Any
    ) -> SyncGuardStream:
        request = self.request(messages, tenant, **overrides)
        return SyncGuardStream(self, request, _timeout_at(request))

    async def aclose(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; in-flight ones finish (`drain`) or fail with `ShutdownError`."""
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.worker.close(drain=drain, timeout=timeout)
        )

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        self.worker.close(drain=drain, timeout=timeout)

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncGuardStream:
    """Blocking iterator over released chunks; `.result` holds the answer once it ends."""

    def __init__(self, guard: Guard, request: Request, timeout_at: float | None) -> None:
        self._guard, self._request, self._timeout_at = guard, request, timeout_at
        self.result: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        if not self._guard._admit_sync(self._request):  # the tenant's rate limit
            self.result = _timeout_answer(self._request)
            yield self.result.text
            return
        sink = _ThreadSink()
        ticket = self._guard.worker.submit(self._request, sink)
        try:
            while True:
                left = None if self._timeout_at is None else self._timeout_at - time.monotonic()
                try:
                    kind, value = sink.items.get(timeout=None if left is None else max(left, 0))
                except queue.Empty:
                    ticket.cancel()
                    self.result = _timeout_answer(self._request)
                    yield self.result.text
                    return
                if kind == "chunk":
                    yield str(value)
                elif kind == "done":
                    self.result = value
                    return
                else:
                    self.result = self._guard._failed(self._request, value)  # or raises
                    yield self.result.text
                    return
        finally:
            if self.result is None:
                ticket.cancel()


def _run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, also from inside a running event loop, where asyncio.run refuses: the
    coroutine then runs on a private loop in a helper thread while this thread waits."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1, thread_name_prefix="guardrail-sync") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _timeout_at(request: Request) -> float | None:
    return None if request.deadline is None else request.deadline + _DEADLINE_GRACE_S


async def _next_item(
    items: asyncio.Queue[tuple[str, Any]], timeout_at: float | None
) -> tuple[str, Any]:
    if timeout_at is None:
        return await items.get()
    left = max(timeout_at - time.monotonic(), 0.0)
    try:
        return await asyncio.wait_for(items.get(), left)
    except asyncio.TimeoutError as exc:  # an alias of TimeoutError from 3.11 on
        raise TimeoutError from exc


def _error(value: BaseException) -> BaseException:
    if isinstance(value, CancelledError):
        return asyncio.CancelledError()
    return value


def _timeout_answer(request: Request) -> Answer:
    """The fail-closed answer when the worker did not answer in time: the refusal text."""
    return _closed_answer(request, "timeout", "deadline")


def _closed_answer(request: Request, path: str, reason: str) -> Answer:
    """The refusal text with a decision that says why no model text was released."""
    decision = Decision(
        guarded=request.guarded,
        gate_score=None,
        threshold=None,
        fired=False,
        path=path,
        tenant=request.tenant,
        reason=reason,
    )
    return Answer(request.refusal_text, decision)


__all__ = ["Guard", "GuardResult", "GuardStream", "SyncGuardStream", "TenantPolicy", "to_messages"]
