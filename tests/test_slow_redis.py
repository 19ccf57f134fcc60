"""A slow Redis never stalls the model thread.

Cost checks run on the worker's model thread, and used to wait on Redis for each look-up
and store (0.5 s timeout each): with Redis answering in 200 ms, every checked row waited.
Now a read waits at most 50 ms, a few slow reads in a row stop reads for a while, and
writes go through a background thread. A TCP proxy in front of the real Redis holds every
reply for 200 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from guardrail.cache import (
    CachedScorer,
    MemoryScores,
    RedisScores,
    Signer,
    TieredScores,
    signing,
)

REDIS = ("127.0.0.1", 6379)
KEY = "operator-key-slow-redis-0123456789"
SIGNER = Signer(KEY.encode())
DELAY = 0.2


class DelayProxy:
    """Forwards TCP to the real Redis, holding each chunk of every reply `delay` seconds."""

    def __init__(self, delay: float = DELAY) -> None:
        self.delay = delay
        self.replies = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(REDIS)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, reply: bool) -> None:
        try:
            while data := source.recv(65536):
                if reply:
                    self.replies += 1  # counted as it arrives, then held
                    time.sleep(self.delay)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@pytest.fixture
def proxy(redis_prefix: str) -> Iterator[DelayProxy]:
    server = DelayProxy()
    yield server
    server.close()


def _length(texts: Sequence[str]) -> list[list[float]]:
    return [[float(len(t))] for t in texts]


def test_scoring_through_a_slow_redis_does_not_wait_on_it(
    proxy: DelayProxy, redis_prefix: str
) -> None:
    remote = RedisScores(proxy.url, signer=SIGNER, prefix=redis_prefix)  # the worker's defaults
    scorer = CachedScorer(
        _length, TieredScores([MemoryScores(), remote]), name="len", fingerprint="v1"
    )
    batches = [[f"answer {i}", f"answer {i} and more"] for i in range(40)]
    started = time.monotonic()
    got = [scorer(texts) for texts in batches]
    elapsed = time.monotonic() - started
    assert got == [_length(texts) for texts in batches]
    assert proxy.replies > 0  # Redis was on the path
    # Each call read and wrote Redis before: 40 * 2 * 0.2 s = 16 s. Now: a few reads of at
    # most 50 ms until the breaker opens, and writes off this thread.
    assert elapsed < 1.5, f"{elapsed:.2f} s"


def test_reads_resume_after_the_breaker_and_signed_values_are_used(redis_prefix: str) -> None:
    proxy = DelayProxy()
    try:
        remote = RedisScores(proxy.url, signer=SIGNER, prefix=redis_prefix, retry_after=0.5)
        remote.put_many({"k": [2.5]})
        assert remote.flush(timeout=5)  # the writer waits up to 0.5 s: 200 ms is enough

        def timed_read() -> tuple[list[list[float] | None], float]:
            started = time.monotonic()
            return remote.get_many(["k"]), time.monotonic() - started

        for _ in range(3):
            found, took = timed_read()
            assert found == [None] and took < 0.15  # too slow to wait for: 50 ms, a miss
        found, took = timed_read()
        assert found == [None] and took < 0.02  # the breaker is open: not even tried
        time.sleep(0.6)
        found, took = timed_read()  # one trial read, still slow: open again, for 1 s
        assert found == [None] and 0.03 < took < 0.15
        found, took = timed_read()
        assert found == [None] and took < 0.02
        proxy.delay = 0.0
        time.sleep(0.6)
        assert timed_read()[0] == [None]  # still open (1 s after the failed trial)
        time.sleep(0.6)
        assert remote.get_many(["k"]) == [[2.5]]  # tried again, in time: used
    finally:
        proxy.close()


def test_a_full_write_queue_drops_instead_of_blocking(redis_prefix: str) -> None:
    proxy = DelayProxy(delay=0.3)
    try:
        remote = RedisScores(proxy.url, signer=SIGNER, prefix=redis_prefix, queue_size=2)
        started = time.monotonic()
        for i in range(20):
            remote.put_many({f"k{i}": [float(i)]})
        assert time.monotonic() - started < 0.2
        assert remote.dropped >= 10
    finally:
        proxy.close()


PROMPTS = [
    "Give me three tips for staying healthy.",
    "What is the capital of France?",
    "Describe how a rainbow forms.",
    "Write a haiku about autumn leaves.",
    "Explain what a binary search does.",
    "Suggest a name for a friendly robot.",
]


class Timed:
    """A score cache that adds up the time its callers (the model thread) spend in it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def get_many(self, keys: Sequence[str]) -> list[list[float] | None]:
        started = time.monotonic()
        try:
            return list(self.inner.get_many(keys))
        finally:
            self.seconds += time.monotonic() - started
            self.calls += 1

    def put_many(self, items: dict[str, list[float]]) -> None:
        started = time.monotonic()
        try:
            self.inner.put_many(items)
        finally:
            self.seconds += time.monotonic() - started
            self.calls += 1


@pytest.mark.slow
def test_a_guard_on_a_slow_redis_answers_as_fast_and_the_same(
    lm: Any, calibration: Any, proxy: DelayProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served path, cost checks every 4 tokens, one request at a time: the same answers
    as without Redis, and neither the cache calls nor the whole run wait on the delays."""
    from guardrail import Guard

    monkeypatch.delenv("GUARDRAIL_REDIS_URL", raising=False)
    monkeypatch.delenv(signing.SHARED_KEY_FILE_ENV, raising=False)
    monkeypatch.setenv(signing.SHARED_KEY_ENV, KEY)

    def run(redis_url: str | None) -> tuple[list[tuple[str, str]], float, Timed]:
        guard = Guard(lm, calibration, redis_url=redis_url, chunk_tokens=4)
        counting = guard.worker.scorers.cost.cache  # CachedCost's CountingScores
        timed = counting.inner = Timed(counting.inner)
        try:

            async def answer_all() -> list[tuple[str, str]]:
                out = []
                for prompt in PROMPTS:  # one at a time: no batching differences
                    answer = await guard.generate(prompt, max_new_tokens=48, temperature=0.0)
                    out.append((answer.text, answer.decision.path))
                return out

            started = time.monotonic()
            answers = asyncio.run(answer_all())
            return answers, time.monotonic() - started, timed
        finally:
            guard.close()

    plain, plain_s, _ = run(None)
    slow, slow_s, timed = run(proxy.url)
    assert slow == plain
    assert proxy.replies > 0  # Redis was on the path
    # Before, every call read or wrote through the proxy: at least DELAY each.
    waited_before = DELAY * timed.calls
    print(
        f"\nno Redis {plain_s:.2f} s; Redis holding replies {DELAY} s: {slow_s:.2f} s, of which "
        f"{timed.seconds:.3f} s in {timed.calls} score-cache calls (at least "
        f"{waited_before:.1f} s before)"
    )
    assert waited_before > 10.0, f"too few cost checks ({timed.calls} calls) to show anything"
    assert timed.seconds < 0.05 * waited_before
    assert slow_s - plain_s < 0.25 * waited_before  # generous: the box is shared
