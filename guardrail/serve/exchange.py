"""One exchange with the worker, written once for every front end (httpx style).

An `Exchange` is one request's round trip: wait for the tenant's rate limit, submit to the
worker, wait for released chunks and the answer up to the deadline, map the outcome, cancel
when the caller leaves. `Guard.generate` and `Guard.stream`, the HTTP server and the
LangChain model all run it; the sync twins (`generate_sync`, `stream_sync`, LangChain's
`invoke` and `stream`) run the same exchange on a private event loop in a helper thread
(`run_sync`, `iterate_sync`), so they also work inside a running event loop (a notebook
cell, a sync callback in an async service), blocking only their own thread.

Outcomes, the same at every entry point:
- the worker's answer, after the chunks it released (each cost-checked);
- the deadline passed (plus a short grace for the worker to say so itself): the tenant's
  refusal text with path "timeout", and the request is cancelled (fail closed);
- an internal error: the refusal text with path "refused" under `fail_mode: refuse` (a
  stream ends with it), the error itself under `fail_mode: error`; errors of the request
  (`InputError`), overload and shutdown are always raised, a cancellation as
  `asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import CancelledError
from typing import Any, TypeVar

from guardrail.decision import Answer, Decision
from guardrail.errors import InputError, OverloadedError, ShutdownError
from guardrail.serve.worker import Request, Ticket, Worker
from guardrail.tenants.resolved import ResolvedTenant

T = TypeVar("T")

# Slack the worker gets past a deadline to answer "timeout" itself (it notices between
# decode steps) before the exchange answers on its behalf.
DEADLINE_GRACE_S = 0.25


class _Sink:
    """Moves worker callbacks onto the exchange's event loop; a closed loop drops them."""

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


class Exchange:
    """Async iterator over released text chunks; `.result` holds the answer once it ends.

    Leaving early (`aclose()`, `async with`, or cancelling the consuming task) cancels the
    request, so its row leaves the batch at the next step.
    """

    def __init__(self, worker: Worker, tenant: ResolvedTenant, request: Request) -> None:
        self.worker, self.tenant, self.request = worker, tenant, request
        self._sink: _Sink | None = None
        self._ticket: Ticket | None = None
        self._closed = False
        self.result: Answer | None = None

    def __aiter__(self) -> Exchange:
        return self

    async def __anext__(self) -> str:
        if self._closed:
            raise StopAsyncIteration
        if self._sink is None:
            if not await self._admit():
                return self._finish(closed_answer(self.request, "timeout", "deadline"))
            self._sink = _Sink(asyncio.get_running_loop())
            self._ticket = self.worker.submit(self.request, self._sink)
        try:
            kind, value = await self._next_item(self._sink.items)
        except TimeoutError:
            self.cancel()
            return self._finish(closed_answer(self.request, "timeout", "deadline"))
        except BaseException:
            self.cancel()
            raise
        if kind == "chunk":
            return str(value)
        self._closed = True
        if kind == "done":
            self.result = value
            raise StopAsyncIteration
        return self._finish(self._failed(value))  # or raises

    async def answer(self) -> Answer:
        """Run to the end; the answer (the chunks are its text, already in it)."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    def cancel(self) -> None:
        self._closed = True
        if self._ticket is not None:
            self._ticket.cancel()

    async def aclose(self) -> None:
        if not self._closed:
            self.cancel()

    def __del__(self) -> None:  # abandoned mid-stream: free the row
        if not self._closed and self._ticket is not None:
            self._ticket.cancel()

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the parts every entry point shares ---------------------------------------------------

    async def _admit(self) -> bool:
        """Wait for the tenant's rate limit; False if the deadline passed while waiting."""
        throttler = self.tenant.throttler
        if throttler is None:
            return True
        deadline = self.request.deadline
        left = None if deadline is None else deadline - time.monotonic()
        try:
            await asyncio.wait_for(throttler.acquire(), left)  # type: ignore[no-untyped-call]
        except asyncio.TimeoutError:
            return False
        return True

    async def _next_item(self, items: asyncio.Queue[tuple[str, Any]]) -> tuple[str, Any]:
        deadline = self.request.deadline
        if deadline is None:
            return await items.get()
        left = max(deadline + DEADLINE_GRACE_S - time.monotonic(), 0.0)
        try:
            return await asyncio.wait_for(items.get(), left)
        except asyncio.TimeoutError as exc:  # an alias of TimeoutError from 3.11 on
            raise TimeoutError from exc

    def _failed(self, error: BaseException) -> Answer:
        """The fail_mode mapping: the refusal text under `refuse`, else raise the error."""
        if isinstance(error, CancelledError):
            raise asyncio.CancelledError()
        if isinstance(error, (InputError, OverloadedError, ShutdownError)):
            raise error
        if self.tenant.policy.fail_mode == "error":
            raise error
        return closed_answer(self.request, "refused", f"error: {error}")

    def _finish(self, answer: Answer) -> str:
        """End with a fail-closed answer, released as the stream's last chunk."""
        self._closed = True
        self.result = answer
        return answer.text


def closed_answer(request: Request, path: str, reason: str) -> Answer:
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


class SyncExchange:
    """The blocking twin: the same `Exchange`, run on the private loop; `.result` at the end."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    @property
    def result(self) -> Answer | None:
        return self.exchange.result

    def __iter__(self) -> Iterator[str]:
        return iterate_sync(self.exchange)

    def answer(self) -> Answer:
        return run_sync(self.exchange.answer())


# --- the private loop of the sync twins -------------------------------------------------------


class _LoopThread:
    """An event loop on a daemon thread, started on first use, stopped at interpreter exit."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="guardrail-exchange", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a sync guard call from the guard's own loop would deadlock")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop())
        try:
            return future.result()
        except BaseException:
            future.cancel()  # the caller left (KeyboardInterrupt, ...): cancel the request
            raise

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()


_PRIVATE = _LoopThread()
atexit.register(_PRIVATE.stop)


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from sync code, in or out of a running event loop."""
    return _PRIVATE.run(coroutine)


def iterate_sync(items: AsyncIterator[T]) -> Iterator[T]:
    """An async iterator, item by item, from sync code; leaving early closes it."""
    done = False
    try:
        while True:
            more, item = _PRIVATE.run(_anext(items))
            if not more:
                done = True
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(items, "aclose", None)
        if not done and close is not None:
            _PRIVATE.run(close())


async def _anext(items: AsyncIterator[T]) -> tuple[bool, T | None]:
    try:
        return True, await items.__anext__()
    except StopAsyncIteration:  # not carried across threads as an exception
        return False, None


__all__ = [
    "DEADLINE_GRACE_S",
    "Exchange",
    "SyncExchange",
    "closed_answer",
    "iterate_sync",
    "run_sync",
]
