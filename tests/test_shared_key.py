"""Shared values are authenticated: what a worker reads back from Redis carries an HMAC under
the operator's key, and anything else (written without the key, with another key, changed
since, or moved to another key) is ignored and logged, never used and never an error.

Against the real Redis at 127.0.0.1:6379, under a per-test prefix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import redis
import torch

from guardrail.cache import (
    Artifacts,
    DirectoryStore,
    RedisScores,
    RedisStore,
    Signer,
    TieredStore,
    score_key,
    signing,
)
from guardrail.cache.artifacts import encode
from guardrail.calibrate.gate import calibrate as real_calibrate
from guardrail.calibrate.store import artifact_key, default_store, load_or_calibrate, score_cache
from guardrail.errors import InputError

SHARED_URL = "redis://127.0.0.1:6379/0"
KEY = b"operator-key-3f9c1e0b7a5d4c2e8f60"
OPERATOR = Signer(KEY)
INTRUDER = Signer(b"someone-elses-key-0000000000000000")


@pytest.fixture
def no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(signing.SHARED_KEY_ENV, raising=False)
    monkeypatch.delenv(signing.SHARED_KEY_FILE_ENV, raising=False)
    monkeypatch.setattr(signing, "_warned_no_key", False)


def _artifacts(value: float) -> Artifacts:
    return Artifacts({"gate.weight": torch.full((8,), value)}, {"gate": {"threshold": value}})


def _scores(redis_prefix: str) -> RedisScores:
    return RedisScores(SHARED_URL, signer=OPERATOR, prefix=redis_prefix, read_timeout=1.0)


def test_artifacts_without_the_operators_key_are_ignored(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStore(SHARED_URL, signer=OPERATOR, prefix=redis_prefix)
    client = redis.Redis.from_url(SHARED_URL)
    # Written the old way (a checksum, no HMAC), as anyone who can reach Redis could.
    manifest, blob = encode(_artifacts(9.0))
    client.hset(
        f"{redis_prefix}:artifacts:planted", mapping={"manifest": manifest, "tensors": blob}
    )
    # Written by a worker holding another key.
    RedisStore(SHARED_URL, signer=INTRUDER, prefix=redis_prefix).save("other", _artifacts(9.0))
    # Signed by the operator, then one tensor changed (the checksum recomputed to match).
    store.save("changed", _artifacts(1.0))
    manifest, blob = encode(_artifacts(9.0))
    client.hset(
        f"{redis_prefix}:artifacts:changed", mapping={"manifest": manifest, "tensors": blob}
    )
    # Signed by the operator for one key, copied under another.
    store.save("source", _artifacts(1.0))
    client.copy(f"{redis_prefix}:artifacts:source", f"{redis_prefix}:artifacts:copied")

    with caplog.at_level(logging.WARNING, logger="guardrail.cache.artifacts"):
        for key in ("planted", "other", "changed", "copied"):
            assert store.load(key) is None, key
    assert caplog.text.count("not signed with this deployment's shared key") == 4

    found = store.load("source")  # the operator's own, untouched: used
    assert found is not None and found.manifest["gate"] == {"threshold": 1.0}
    assert torch.equal(found.tensors["gate.weight"], torch.full((8,), 1.0))


def test_scores_without_the_operators_key_are_ignored(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    scores = _scores(redis_prefix)
    client = redis.Redis.from_url(SHARED_URL)
    signed, unsigned, foreign, tampered, copied = (
        score_key("cost", "fp", name) for name in ("signed", "unsigned", "foreign", "t", "c")
    )
    scores.put_many({signed: [7.5], tampered: [7.5]})
    assert scores.flush()
    body = json.dumps([0.0])
    plain = {"v": body, "sha256": "0" * 64}  # the old format: a checksum anyone can compute
    client.set(f"{redis_prefix}:scores:{unsigned}", json.dumps(plain))
    other = {"v": body, "hmac": INTRUDER.tag("scores", foreign, body.encode())}
    client.set(f"{redis_prefix}:scores:{foreign}", json.dumps(other))
    item = json.loads(client.get(f"{redis_prefix}:scores:{tampered}") or b"{}")
    client.set(f"{redis_prefix}:scores:{tampered}", json.dumps({**item, "v": body}))  # zeroed
    client.copy(f"{redis_prefix}:scores:{signed}", f"{redis_prefix}:scores:{copied}")

    with caplog.at_level(logging.WARNING, logger="guardrail.cache.scores"):
        found = scores.get_many([signed, unsigned, foreign, tampered, copied])
    assert found == [[7.5], None, None, None, None]
    assert caplog.text.count("ignoring cached score") == 4


def test_a_cost_model_recomputes_a_planted_zero(redis_prefix: str) -> None:
    """A zeroed cost in Redis must not let a harmful answer through: it is recomputed."""
    from guardrail.budget.scoring import CachedCost

    class Length:
        name, fingerprint, reads_prompt = "length", "v1", False

        def __init__(self) -> None:
            self.calls: list[str] = []

        def cost(self, prompts: list[str], responses: list[str]) -> list[float]:
            self.calls.extend(responses)
            return [float(len(r)) for r in responses]

    model = Length()
    cost = CachedCost(model, _scores(redis_prefix))
    key = score_key("length", "v1", "\x00harmful answer")
    body = json.dumps([0.0])
    planted = {"v": body, "hmac": INTRUDER.tag("scores", key, body.encode())}
    redis.Redis.from_url(SHARED_URL).set(f"{redis_prefix}:scores:{key}", json.dumps(planted))
    assert cost.cost(["p"], ["harmful answer"]) == [14.0]
    assert model.calls == ["harmful answer"]


def test_a_worker_ignores_a_calibration_written_without_the_key(
    tiny_llama: Any, tmp_path: Path, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_calibrate_mechanics import _config

    config = _config(tmp_path, layer_fractions=(0.5,), strength_fractions=(0.25,))
    key = artifact_key(tiny_llama, config)
    honest = load_or_calibrate(
        tiny_llama, config, store=DirectoryStore(tmp_path / "honest"), progress=False
    )
    forged = honest.to_artifacts()
    forged.tensors["gate.weight"] = torch.zeros_like(forged.tensors["gate.weight"])
    manifest, blob = encode(forged)  # a gate that never fires, with a valid checksum
    redis.Redis.from_url(SHARED_URL).hset(
        f"{redis_prefix}:artifacts:{key}", mapping={"manifest": manifest, "tensors": blob}
    )
    calibrated: list[bool] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calibrated.append(True)
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr("guardrail.calibrate.store.calibrate", counting)
    shared = RedisStore(SHARED_URL, signer=OPERATOR, prefix=redis_prefix)
    worker_store = TieredStore([DirectoryStore(tmp_path / "worker"), shared])
    loaded = load_or_calibrate(tiny_llama, config, store=worker_store, progress=False)
    assert calibrated == [True]  # the forged gate was not used: calibrated instead
    assert loaded.gate.weight.abs().sum() > 0
    assert honest.gate.weight.abs().sum() > 0
    assert shared.load(key) is not None  # and the operator's own result replaced it


def test_tags_of_any_shape_are_checked_not_raised() -> None:
    good = OPERATOR.tag("scores", "k", b"[1.0]")
    assert OPERATOR.verify(good, "scores", "k", b"[1.0]")
    assert OPERATOR.verify(good.encode(), "scores", "k", b"[1.0]")
    for bad in (None, 7, ["x"], "ü" * 64, b"\xff" * 64, good.upper(), good[:-1]):
        assert not OPERATOR.verify(bad, "scores", "k", b"[1.0]"), bad
    assert not OPERATOR.verify(good, "scores", "other", b"[1.0]")
    assert not OPERATOR.verify(good, "artifacts", "k", b"[1.0]")
    assert OPERATOR.tag("a", "bc") != OPERATOR.tag("ab", "c")  # fields are length-prefixed


def test_without_a_key_redis_is_not_used_and_that_is_said_once(
    no_key_env: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GUARDRAIL_REDIS_URL", SHARED_URL)
    with caplog.at_level(logging.WARNING, logger="guardrail.cache.signing"):
        for store in (default_store(), default_store(SHARED_URL)):
            assert [type(s).__name__ for s in store.stores] == ["DirectoryStore", "ShippedStore"]
        assert type(score_cache()).__name__ == "MemoryScores"
    assert caplog.text.count("no shared key") == 1
    monkeypatch.setenv(signing.SHARED_KEY_ENV, KEY.decode())
    store = default_store()
    assert isinstance(store, TieredStore) and isinstance(store.stores[1], RedisStore)
    assert type(score_cache()).__name__ == "TieredScores"


def test_the_key_comes_from_a_file_flag_or_environment(
    no_key_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert signing.shared_key() is None
    monkeypatch.setenv(signing.SHARED_KEY_ENV, "from-the-environment-123")
    assert signing.shared_key() == b"from-the-environment-123"
    path = tmp_path / "shared.key"
    path.write_text("from-the-file-0123456789\n")
    monkeypatch.setenv(signing.SHARED_KEY_FILE_ENV, str(path))
    assert signing.shared_key() == b"from-the-file-0123456789"  # the file wins
    explicit = tmp_path / "flag.key"
    explicit.write_bytes(b"from-the-flag-0123456789")
    assert signing.shared_key(explicit) == b"from-the-flag-0123456789"
    with pytest.raises(InputError, match=r"shared key file .*missing\.key"):
        signing.shared_key(tmp_path / "missing.key")
    (tmp_path / "short.key").write_text("short")
    with pytest.raises(InputError, match=r"short\.key: 5 bytes, need at least 16"):
        signing.shared_key(tmp_path / "short.key")


def test_cli_rejects_a_bad_key_file_by_name(tmp_path: Path) -> None:
    from conftest import run_cli

    (tmp_path / "short.key").write_text("tiny")
    done = run_cli(
        "chat", "hi", "--redis-url", SHARED_URL, "--shared-key-file", "short.key", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "shared key file short.key: 4 bytes, need at least 16" in done.stderr


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    from conftest import _tiny

    return _tiny("llama")
