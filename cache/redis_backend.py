"""A Redis connection that never fails a request: short timeouts, a breaker, one log line.

When Redis is down or slow, callers get `None` (as if the value were absent) and compute
locally. A call that fails, or answers later than `timeout`, is a strike; `trip_after`
strikes in a row open the breaker, and Redis is skipped for `retry_after` seconds. Then one
call tries it: a success closes the breaker, a strike opens it again for twice as long (up
to `max_retry_after`). redis-py's own retries are off, so one call costs at most about
`timeout`. The URL comes from the caller or `GUARDRAIL_REDIS_URL`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

REDIS_URL_ENV = "GUARDRAIL_REDIS_URL"


def redis_url_from_env() -> str | None:
    return os.environ.get(REDIS_URL_ENV) or None


class SafeRedis:
    """`call(fn)` runs `fn(client)`; any Redis error returns None and counts a strike."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "guardrail",
        timeout: float = 0.5,
        retry_after: float = 5.0,
        trip_after: int = 1,
        max_retry_after: float | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.retry_after = retry_after
        self.max_retry_after = max(retry_after, max_retry_after or retry_after)
        self.trip_after = max(1, trip_after)
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # a retry would double the time a slow call takes
        )
        self._down_until = 0.0
        self._strikes = 0
        self._wait = retry_after  # how long the breaker stays open next time
        self._tripped = False  # open, or past its wait with no success since
        self._warned = False
        self._lock = threading.Lock()

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def call(self, fn: Callable[[Any], T]) -> T | None:
        if not self.available:
            return None
        started = time.monotonic()
        try:
            result = fn(self.client)
        except (redis.RedisError, OSError) as exc:
            self._strike(str(exc) or type(exc).__name__)
            return None
        took = time.monotonic() - started
        if took > self.timeout:  # answered, but too late to rely on: a strike all the same
            self._strike(f"slow: {took:.3f} s > {self.timeout} s")
            return result
        with self._lock:
            self._strikes, self._tripped, self._wait = 0, False, self.retry_after
            if self._warned:
                self._warned = False
                log.warning("redis at %s is back", self.url)
        return result

    def _strike(self, why: str) -> None:
        with self._lock:
            self._strikes += 1
            if self._tripped:  # the one trial after a wait failed: wait longer
                self._wait = min(2 * self._wait, self.max_retry_after)
            elif self._strikes < self.trip_after:
                return
            self._strikes, self._tripped = 0, True
            self._down_until = time.monotonic() + self._wait
            if not self._warned:  # once per outage, not once per request
                log.warning(
                    "redis at %s unavailable, computing locally for %.3g s: %s",
                    self.url,
                    self._wait,
                    why,
                )
                self._warned = True


__all__ = ["REDIS_URL_ENV", "SafeRedis", "redis_url_from_env"]
