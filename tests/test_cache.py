"""Artifact and score caches on every backend, against real Redis servers.

The shared server at 127.0.0.1:6379 (`.ci/run` starts it) holds round trips under a
per-test prefix; outages use a private `redis-server` on a free port that the test stops
and restarts, and a dead port.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from guardrail.cache import (
    Artifacts,
    ArtifactStore,
    CachedScorer,
    CountingScores,
    DirectoryStore,
    DiskScores,
    MemoryScores,
    MemoryStore,
    RedisScores,
    RedisStore,
    ScoreCache,
    Signer,
    TieredScores,
    TieredStore,
    score_key,
)
from guardrail.calibrate.store import artifact_key, load_or_calibrate

SHARED_URL = "redis://127.0.0.1:6379/0"
SIGNER = Signer(b"test-operator-key-0123456789abcdef")


@pytest.fixture
def prefix() -> Iterator[str]:
    """A key prefix of this test's own on the shared server, deleted afterwards."""
    client = redis.Redis.from_url(SHARED_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis at {SHARED_URL} (.ci/run starts one): {exc}")
    name = f"guardrail-test-{uuid.uuid4().hex[:12]}"
    yield name
    keys = list(client.scan_iter(f"{name}:*"))
    if keys:
        client.delete(*keys)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own, to stop mid-run (no disk, debug commands on)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        self.binary, self.port = binary, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--enable-debug-command",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"private redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


def _every_kind() -> Artifacts:
    """One of each kind of stored artifact: steering vectors and gate settings (float32),
    critic weights (an MLP's state dict), a cost probe (bf16 weights), integer indices."""
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Linear(9, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    tensors = {
        "ssv.srv": torch.randn(30, 576),
        "gate.weight": torch.randn(5 * 576),
        **{f"critic.{k}": v for k, v in critic.state_dict().items()},
        "cost_probe.weight": torch.randn(384, dtype=torch.bfloat16),
        "gate.layers": torch.tensor([4, 8, 12], dtype=torch.int64),
    }
    manifest = {"schema": 3, "gate": {"threshold": 0.25, "layers": [4, 8, 12]}, "note": "ü"}
    return Artifacts(tensors, manifest)


def _assert_same(loaded: Artifacts | None, original: Artifacts) -> None:
    assert loaded is not None
    assert {k: v for k, v in loaded.manifest.items() if k != "tensors_sha256"} == original.manifest
    assert set(loaded.tensors) == set(original.tensors)
    for name, tensor in original.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert torch.equal(loaded.tensors[name], tensor), name


def _stores(tmp_path: Path, prefix: str) -> dict[str, ArtifactStore]:
    return {
        "memory": MemoryStore(),
        "directory": DirectoryStore(tmp_path / "artifacts"),
        "redis": RedisStore(SHARED_URL, signer=SIGNER, prefix=prefix),
        "tiered": TieredStore(
            [MemoryStore(), RedisStore(SHARED_URL, signer=SIGNER, prefix=prefix + "-t")]
        ),
    }


def test_every_artifact_kind_round_trips_on_every_backend(tmp_path: Path, prefix: str) -> None:
    original = _every_kind()
    for name, store in _stores(tmp_path, prefix).items():
        assert store.load("k") is None, name
        store.save("k", original)
        _assert_same(store.load("k"), original)
    raw = redis.Redis.from_url(SHARED_URL).hgetall(f"{prefix}:artifacts:k")
    assert set(raw) == {b"manifest", b"tensors", b"hmac"}  # JSON and safetensors, no pickle
    assert raw[b"tensors"][8:9] == b"{"  # safetensors: u64 header length, then a JSON header


def test_tampered_redis_artifacts_are_ignored(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(SHARED_URL, signer=SIGNER, prefix=prefix)
    store.save("k", _every_kind())
    client = redis.Redis.from_url(SHARED_URL)
    name = f"{prefix}:artifacts:k"
    blob = bytearray(client.hget(name, "tensors") or b"")
    blob[-1] ^= 0xFF
    client.hset(name, "tensors", bytes(blob))
    with caplog.at_level(logging.WARNING):
        assert store.load("k") is None
    assert "not signed with this deployment's shared key" in caplog.text
    client.hset(name, "manifest", b"{not json")
    assert store.load("k") is None
    client.hdel(name, "tensors")
    assert store.load("k") is None


def test_tiered_store_reads_through_and_fills_earlier_tiers(tmp_path: Path, prefix: str) -> None:
    original = _every_kind()
    RedisStore(SHARED_URL, signer=SIGNER, prefix=prefix).save("k", original)
    local = DirectoryStore(tmp_path / "local")
    tiered = TieredStore([local, RedisStore(SHARED_URL, signer=SIGNER, prefix=prefix)])
    _assert_same(tiered.load("k"), original)
    _assert_same(local.load("k"), original)  # the next start needs no Redis


def _shared_scores(prefix: str, **options: Any) -> RedisScores:
    """Scores on the shared server, with a read budget generous enough for a busy CI box
    (the default, 50 ms, is what the model thread waits at most)."""
    return RedisScores(SHARED_URL, signer=SIGNER, prefix=prefix, read_timeout=1.0, **options)


class Flushed:
    """A score cache whose writes have landed before `put_many` returns (Redis writes go
    through a background thread)."""

    def __init__(self, inner: RedisScores) -> None:
        self.inner = inner

    def get_many(self, keys: Sequence[str]) -> list[list[float] | None]:
        return self.inner.get_many(keys)

    def put_many(self, items: dict[str, list[float]]) -> None:
        self.inner.put_many(items)
        assert self.inner.flush(timeout=5.0)


def _score_caches(tmp_path: Path, prefix: str, ttl: float) -> dict[str, ScoreCache]:
    return {
        "memory": MemoryScores(ttl=ttl),
        "disk": DiskScores(tmp_path / "scores", ttl=ttl),
        "redis": Flushed(_shared_scores(prefix, ttl=ttl)),
    }


def test_scores_round_trip_and_expire_on_every_backend(tmp_path: Path, prefix: str) -> None:
    a, b = score_key("cost", "fp1", "prompt", "answer a"), score_key("cost", "fp1", "p", "b")
    assert a != b and a != score_key("cost", "fp2", "prompt", "answer a")  # model in the key
    assert score_key("cost", "fp1", "ab", "c") != score_key("cost", "fp1", "a", "bc")
    for name, cache in _score_caches(tmp_path, prefix, ttl=1.0).items():
        assert cache.get_many([a, b]) == [None, None], name
        cache.put_many({a: [0.25, -1.5], b: [3.0]})
        assert cache.get_many([b, a]) == [[3.0], [0.25, -1.5]], name
    time.sleep(1.2)
    for name, cache in _score_caches(tmp_path, prefix, ttl=1.0).items():
        assert cache.get_many([a, b]) == [None, None], f"{name} kept an expired score"


def test_tampered_scores_are_misses(tmp_path: Path, prefix: str) -> None:
    key = score_key("critic", "fp", "state")
    disk = DiskScores(tmp_path / "scores")
    disk.put_many({key: [1.0]})
    path = next((tmp_path / "scores").rglob("*.json"))
    path.write_text(path.read_text().replace("1.0", "9.0"))
    assert disk.get_many([key]) == [None]
    remote = Flushed(_shared_scores(prefix))
    remote.put_many({key: [1.0]})
    assert remote.get_many([key]) == [[1.0]]
    redis.Redis.from_url(SHARED_URL).set(f"{prefix}:scores:{key}", b"\x80\x04garbage")
    assert remote.get_many([key]) == [None]


def test_memory_scores_are_bounded_least_recently_used_first() -> None:
    cache = MemoryScores(max_items=3)
    cache.put_many({"a": [1.0], "b": [2.0], "c": [3.0]})
    assert cache.get_many(["a"]) == [[1.0]]  # "a" is now the most recently used
    cache.put_many({"d": [4.0], "e": [5.0]})
    assert len(cache) == 3
    assert cache.get_many(["a", "b", "c", "d", "e"]) == [[1.0], None, None, [4.0], [5.0]]


def test_tiered_scores_fill_memory_from_redis(prefix: str) -> None:
    shared = Flushed(_shared_scores(prefix))
    shared.put_many({"k": [0.5]})
    memory = MemoryScores()
    tiered = TieredScores([memory, shared])
    assert tiered.get_many(["k", "missing"]) == [[0.5], None]
    assert memory.get_many(["k"]) == [[0.5]]  # the next check needs no round trip
    tiered.put_many({"new": [2.0]})
    assert memory.get_many(["new"]) == [[2.0]] and shared.get_many(["new"]) == [[2.0]]


def test_counting_scores_hit_rate() -> None:
    cache = CountingScores(MemoryScores())
    keys = [score_key("cost", "fp", str(i)) for i in range(4)]
    assert cache.get_many(keys) == [None] * 4
    cache.put_many({k: [float(i)] for i, k in enumerate(keys[:2])})
    assert cache.get_many(keys) == [[0.0], [1.0], None, None]
    assert (cache.hits, cache.misses) == (2, 6) and cache.hit_rate == 0.25


def test_cached_scorer_computes_each_miss_once(prefix: str) -> None:
    calls: list[list[str]] = []

    def length(texts: Sequence[str]) -> list[list[float]]:
        calls.append(list(texts))
        return [[float(len(t))] for t in texts]

    shared = Flushed(_shared_scores(prefix))
    scorer = CachedScorer(length, CountingScores(shared), name="len", fingerprint="v1")
    assert scorer(["ab", "c", "ab"]) == [[2.0], [1.0], [2.0]]
    assert scorer(["c", "xyz"]) == [[1.0], [3.0]]
    assert calls == [["ab", "c"], ["xyz"]]
    other_worker = CachedScorer(length, shared, name="len", fingerprint="v1")
    assert other_worker(["xyz", "ab"]) == [[3.0], [2.0]] and len(calls) == 2
    CachedScorer(length, shared, name="len", fingerprint="v2")(["ab"])
    assert calls[-1] == ["ab"]  # another scorer version never reuses these scores


def test_outage_mid_run_loses_nothing(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(private_redis.url, signer=SIGNER, retry_after=0.2)
    scores = RedisScores(private_redis.url, signer=SIGNER, retry_after=0.2)
    first, second = _every_kind(), Artifacts({"x": torch.ones(3)}, {"n": 2})
    store.save("before", first)
    private_redis.stop()

    with caplog.at_level(logging.WARNING, logger="guardrail.cache.redis_backend"):
        started = time.monotonic()
        assert store.load("before") is None  # a miss, not an error
        store.save("during", second)  # kept pending
        for _ in range(5):
            assert scores.get_many(["k"]) == [None]
            scores.put_many({"k": [1.0]})
        assert time.monotonic() - started < 3.0
    # Once per connection (the store's, the scores' reads and their writes), not once per call.
    assert caplog.text.count("unavailable") <= 3
    assert set(store.pending) == {"during"}

    private_redis.start()  # empty again: it keeps nothing on disk
    time.sleep(0.3)  # past retry_after
    with caplog.at_level(logging.WARNING, logger="guardrail.cache.redis_backend"):
        _assert_same(store.load("during"), second)  # the pending write went in first
    assert "is back" in caplog.text and not store.pending


def test_slow_redis_is_a_quick_miss(private_redis: PrivateRedis) -> None:
    store = RedisStore(private_redis.url, signer=SIGNER, timeout=0.3)
    store.save("k", _every_kind())
    blocker = threading.Thread(
        target=lambda: redis.Redis.from_url(private_redis.url).execute_command("DEBUG", "SLEEP", 3)
    )
    blocker.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert store.load("k") is None
    assert time.monotonic() - started < 1.5
    blocker.join()


def test_dead_port_never_fails_a_tiered_store(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{_free_port()}/0"
    tiered = TieredStore([DirectoryStore(tmp_path), RedisStore(dead, signer=SIGNER)])
    original = _every_kind()
    tiered.save("k", original)
    _assert_same(tiered.load("k"), original)
    scores = RedisScores(dead, signer=SIGNER)
    scores.put_many({"a": [1.0]})
    assert scores.get_many(["a"]) == [None] and scores.flush()


def test_worker_on_a_warm_redis_starts_without_calibrating(
    tiny_llama: Any, tmp_path: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_calibrate_mechanics import _config

    config = _config(tmp_path, layer_fractions=(0.5,), strength_fractions=(0.25,))
    shared = RedisStore(SHARED_URL, signer=SIGNER, prefix=prefix)
    first_worker = TieredStore([DirectoryStore(tmp_path / "a"), shared])
    calibrated = load_or_calibrate(tiny_llama, config, store=first_worker, progress=False)

    def no_calibration(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("calibrated although Redis held the artifacts")

    monkeypatch.setattr("guardrail.calibrate.store.calibrate", no_calibration)
    fresh_disk = DirectoryStore(tmp_path / "b")
    second_worker = TieredStore([fresh_disk, shared])
    loaded = load_or_calibrate(tiny_llama, config, store=second_worker, progress=False)
    assert loaded.manifest["seconds"] == calibrated.manifest["seconds"]  # read, not recomputed
    assert loaded.gate.threshold == calibrated.gate.threshold
    torch.testing.assert_close(loaded.gate.weight, calibrated.gate.weight)
    assert fresh_disk.load(artifact_key(tiny_llama, config)) is not None


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    from conftest import _tiny

    return _tiny("llama")
