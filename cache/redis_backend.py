"""A Redis connection that never fails a request: short timeouts, a breaker, one log line.

When Redis is down or slow, callers get `None` (as if the value were absent) and compute
locally; after a failure Redis is skipped for `retry_after` seconds, then tried again. The
URL comes from the caller or `GUARDRAIL_REDIS_URL`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")

REDIS_URL_ENV = "GUARDRAIL_REDIS_URL"


def redis_url_from_env() -> str | None:
    return os.environ.get(REDIS_URL_ENV) or None


class SafeRedis:
    """`call(fn)` runs `fn(client)`; any Redis error returns None and opens the breaker."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "guardrail",
        timeout: float = 0.5,
        retry_after: float = 5.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.retry_after = retry_after
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._down_until = 0.0
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
        try:
            result = fn(self.client)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._down_until = time.monotonic() + self.retry_after
                if not self._warned:  # once per outage, not once per request
                    log.warning("redis at %s unavailable, computing locally: %s", self.url, exc)
                    self._warned = True
            return None
        if self._warned:
            with self._lock:
                self._warned = False
                log.warning("redis at %s is back", self.url)
        return result


__all__ = ["REDIS_URL_ENV", "SafeRedis", "redis_url_from_env"]
