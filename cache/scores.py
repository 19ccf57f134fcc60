"""Score cache: cost scores and critic outputs by content hash, with a TTL.

Keys hash everything a score depends on (`score_key`: the scorer's name and fingerprint, a
schema version and the scored text), so a score is never reused for another model or
input. Values are JSON lists of floats; on disk with a checksum, in Redis (shared, so
anyone with access could write) with an HMAC under the operator's key (`signing`). A value
that fails either is a miss. Backends: memory (bounded, TTL and LRU), disk (one JSON file
per key) and Redis (which expires keys itself), usually memory in front of Redis
(`TieredScores`). A broken, slow or unreachable backend is a miss, never a failed request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from cachetools import TTLCache

from guardrail.cache.redis_backend import SafeRedis
from guardrail.cache.signing import Signer

log = logging.getLogger(__name__)

SCORE_SCHEMA = 1
Scores = list[float]


def score_key(scorer: str, fingerprint: str, *texts: str) -> str:
    digest = hashlib.sha256()
    for part in (scorer, fingerprint, str(SCORE_SCHEMA), *texts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _pack(scores: Scores) -> bytes:
    body = json.dumps([float(x) for x in scores])
    return json.dumps({"v": body, "sha256": hashlib.sha256(body.encode()).hexdigest()}).encode()


def _unpack(raw: bytes, where: str) -> Scores | None:
    try:
        item = json.loads(raw)
        body = item["v"]
        if hashlib.sha256(body.encode()).hexdigest() != item["sha256"]:
            raise ValueError("checksum mismatch")
        values = json.loads(body)
        return [float(x) for x in values]
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring cached score %s: %s", where, exc)
        return None


class ScoreCache(Protocol):
    def get_many(self, keys: Sequence[str]) -> list[Scores | None]: ...

    def put_many(self, items: dict[str, Scores]) -> None: ...


class MemoryScores:
    """In-process scores: a TTL and LRU bounded `cachetools.TTLCache` (thread-safe here,
    since the model thread and the event loop both score)."""

    def __init__(self, ttl: float = 86400.0, max_items: int = 100_000) -> None:
        self.ttl, self.max_items = ttl, max_items
        self._items: TTLCache[str, tuple[float, ...]] = TTLCache(
            maxsize=max_items, ttl=ttl, timer=time.monotonic
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._items.expire()
            return len(self._items)

    def get_many(self, keys: Sequence[str]) -> list[Scores | None]:
        with self._lock:
            found = [self._items.get(key) for key in keys]
        return [list(item) if item is not None else None for item in found]

    def put_many(self, items: dict[str, Scores]) -> None:
        with self._lock:  # full: the least recently used entries go first
            for key, scores in items.items():
                self._items[key] = tuple(float(x) for x in scores)


class DiskScores:
    """One small JSON file per key; the file's age is its TTL clock."""

    def __init__(self, root: str | Path, ttl: float = 86400.0) -> None:
        self.root, self.ttl = Path(root), ttl

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get_many(self, keys: Sequence[str]) -> list[Scores | None]:
        out: list[Scores | None] = []
        for key in keys:
            path = self._path(key)
            try:
                if time.time() - path.stat().st_mtime > self.ttl:
                    out.append(None)
                    continue
                out.append(_unpack(path.read_bytes(), str(path)))
            except OSError:
                out.append(None)
        return out

    def put_many(self, items: dict[str, Scores]) -> None:
        for key, scores in items.items():
            path = self._path(key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
                with os.fdopen(fd, "wb") as handle:
                    handle.write(_pack(scores))
                os.replace(staging, path)
            except OSError as exc:
                log.warning("score cache at %s not written: %s", self.root, exc)
                return


def _pack_signed(signer: Signer, key: str, scores: Scores) -> bytes:
    body = json.dumps([float(x) for x in scores])
    return json.dumps({"v": body, "hmac": signer.tag("scores", key, body.encode())}).encode()


def _unpack_signed(signer: Signer, key: str, raw: bytes, where: str) -> Scores | None:
    try:
        item = json.loads(raw)
        body = item["v"]
        if not isinstance(body, str) or not signer.verify(
            item.get("hmac"), "scores", key, body.encode()
        ):
            raise ValueError("not signed with this deployment's shared key")
        return [float(x) for x in json.loads(body)]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring cached score %s: %s", where, exc)
        return None


class RedisScores:
    """`guardrail:scores:KEY` with Redis's own expiry, each value HMAC-signed by `signer`.

    Built for the model thread, which must never wait on Redis: a read waits at most
    `read_timeout` (a miss after that), and `trip_after` slow or failed reads in a row stop
    reads for `retry_after` seconds, then for twice as long after each failed trial read,
    up to `max_retry_after`. Writes go to a background thread through a queue of
    `queue_size` batches; when it is full a batch is dropped (counted in `dropped`), since a
    score not shared is only recomputed. An outage or a bad value is a miss, never an error.
    """

    def __init__(
        self,
        url: str,
        *,
        signer: Signer,
        ttl: float = 86400.0,
        prefix: str = "guardrail",
        timeout: float = 0.5,
        read_timeout: float = 0.05,
        retry_after: float = 5.0,
        max_retry_after: float = 60.0,
        trip_after: int = 3,
        queue_size: int = 256,
    ) -> None:
        self.signer, self.ttl = signer, ttl
        self.reader = SafeRedis(
            url,
            prefix=prefix,
            timeout=read_timeout,
            retry_after=retry_after,
            max_retry_after=max_retry_after,
            trip_after=trip_after,
        )
        self.writer = SafeRedis(url, prefix=prefix, timeout=timeout, retry_after=retry_after)
        self.dropped = 0
        self._queue: queue.Queue[dict[str, Scores]] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def get_many(self, keys: Sequence[str]) -> list[Scores | None]:
        names = [self.reader.key("scores", k) for k in keys]
        found = self.reader.call(lambda r: r.mget(names)) if names else []
        if found is None:
            return [None] * len(keys)
        return [
            _unpack_signed(self.signer, key, raw, name) if raw else None
            for key, raw, name in zip(keys, found, names, strict=True)
        ]

    def put_many(self, items: dict[str, Scores]) -> None:
        if not items:
            return
        try:
            self._queue.put_nowait({k: [float(x) for x in v] for k, v in items.items()})
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("redis score writes fall behind: dropping some (not shared)")
            return
        with self._start:  # the writer exits when idle; start one if none is running
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._write_queued, name="guardrail-score-writer", daemon=True
                )
                self._thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued write was tried (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _write_queued(self) -> None:
        while True:
            try:
                items = self._queue.get(timeout=1.0)
            except queue.Empty:
                with self._start:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            try:
                self.writer.call(lambda r, batch=items: self._write(r, batch))
            finally:
                self._queue.task_done()

    def _write(self, client: Any, items: dict[str, Scores]) -> bool:
        pipe = client.pipeline()
        for key, scores in items.items():
            value = _pack_signed(self.signer, key, scores)
            pipe.set(self.writer.key("scores", key), value, px=int(self.ttl * 1000))
        pipe.execute()
        return True


class TieredScores:
    """Read through `caches` in order (a hit fills the earlier ones); write to all. A memory
    cache in front of Redis answers repeated checks without a round trip."""

    def __init__(self, caches: Sequence[ScoreCache]) -> None:
        self.caches = list(caches)

    def get_many(self, keys: Sequence[str]) -> list[Scores | None]:
        out: list[Scores | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for i, cache in enumerate(self.caches):
            if not todo:
                break
            found = cache.get_many([keys[j] for j in todo])
            hits = {keys[j]: v for j, v in zip(todo, found, strict=True) if v is not None}
            for j, value in zip(todo, found, strict=True):
                out[j] = value
            if hits:
                for earlier in self.caches[:i]:
                    earlier.put_many(hits)
            todo = [j for j in todo if out[j] is None]
        return out

    def put_many(self, items: dict[str, Scores]) -> None:
        for cache in self.caches:
            cache.put_many(items)


class CachedScorer:
    """A batched scorer behind a score cache: look every text up, compute the misses in one
    call, store them. Scores are keyed by the scorer's name and fingerprint."""

    def __init__(
        self,
        score: Callable[[Sequence[str]], Sequence[Scores]],
        cache: ScoreCache,
        *,
        name: str,
        fingerprint: str,
    ) -> None:
        self.score, self.cache, self.name, self.fingerprint = score, cache, name, fingerprint

    def __call__(self, texts: Sequence[str]) -> list[Scores]:
        keys = [score_key(self.name, self.fingerprint, text) for text in texts]
        found = self.cache.get_many(keys)
        todo: dict[str, str] = {}  # a text repeated within the call is scored once
        for key, text, value in zip(keys, texts, found, strict=True):
            if value is None:
                todo.setdefault(key, text)
        fresh: dict[str, Scores] = {}
        if todo:
            computed = self.score(list(todo.values()))
            fresh = {key: [float(x) for x in v] for key, v in zip(todo, computed, strict=True)}
            self.cache.put_many(fresh)
        return [fresh[key] if v is None else v for key, v in zip(keys, found, strict=True)]


class CountingScores:
    """Wraps a cache and counts hits and misses (benchmarks, metrics)."""

    def __init__(self, inner: ScoreCache) -> None:
        self.inner, self.hits, self.misses = inner, 0, 0

    def get_many(self, keys: Sequence[str]) -> list[Scores | None]:
        found = self.inner.get_many(keys)
        hits = sum(x is not None for x in found)
        self.hits += hits
        self.misses += len(found) - hits
        return found

    def put_many(self, items: dict[str, Scores]) -> None:
        self.inner.put_many(items)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


__all__ = [
    "CachedScorer",
    "CountingScores",
    "DiskScores",
    "MemoryScores",
    "RedisScores",
    "ScoreCache",
    "TieredScores",
    "score_key",
]
