"""Score cache: cost scores and critic outputs by content hash, with a TTL.

Keys hash everything a score depends on (`score_key`: the scorer's name and fingerprint, a
schema version and the scored text), so a score is never reused for another model or
input. Values are JSON lists of floats with a checksum; a value that fails it is a miss.
Backends: memory, disk (one JSON file per key) and Redis (which expires keys itself).
A broken or unreachable backend is a miss, never a failed request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from guardrail.cache.redis_backend import SafeRedis

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
    def __init__(self, ttl: float = 86400.0, max_items: int = 100_000) -> None:
        self.ttl, self.max_items = ttl, max_items
        self._items: dict[str, tuple[float, Scores]] = {}

    def get_many(self, keys: Sequence[str]) -> list[Scores | None]:
        now = time.monotonic()
        out: list[Scores | None] = []
        for key in keys:
            item = self._items.get(key)
            out.append(list(item[1]) if item and item[0] > now else None)
        return out

    def put_many(self, items: dict[str, Scores]) -> None:
        if len(self._items) + len(items) > self.max_items:  # simplest bound: start over
            self._items.clear()
        expires = time.monotonic() + self.ttl
        self._items.update({k: (expires, list(v)) for k, v in items.items()})


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


class RedisScores:
    """`guardrail:scores:KEY` with Redis's own expiry; an outage is a miss."""

    def __init__(
        self,
        url: str,
        *,
        ttl: float = 86400.0,
        prefix: str = "guardrail",
        timeout: float = 0.5,
        retry_after: float = 5.0,
    ) -> None:
        self.redis = SafeRedis(url, prefix=prefix, timeout=timeout, retry_after=retry_after)
        self.ttl = ttl

    def get_many(self, keys: Sequence[str]) -> list[Scores | None]:
        names = [self.redis.key("scores", k) for k in keys]
        found = self.redis.call(lambda r: r.mget(names)) if names else []
        if found is None:
            return [None] * len(keys)
        return [_unpack(raw, name) if raw else None for raw, name in zip(found, names, strict=True)]

    def put_many(self, items: dict[str, Scores]) -> None:
        def write(client: object) -> bool:
            pipe = client.pipeline()  # type: ignore[attr-defined]
            for key, scores in items.items():
                pipe.set(self.redis.key("scores", key), _pack(scores), px=int(self.ttl * 1000))
            pipe.execute()
            return True

        if items:
            self.redis.call(write)


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
    "score_key",
]
