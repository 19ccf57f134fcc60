"""Tenant policy files: schema, `extends`, errors naming file/line/field, reload with last good
kept, per-tenant application in the Guard (isolation, rate limits), and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from test_worker import hand_calibration

from conftest import _tiny
from guardrail.errors import CalibrationError
from guardrail.gate.artifact import Calibration
from guardrail.serve.guard import Guard
from guardrail.serve.worker import LocalWorker
from guardrail.tenants.schema import (
    Policy,
    PolicyError,
    check_policies,
    default_policy,
    load_policy,
)
from guardrail.tenants.store import PolicyStore, TenantPolicy, UnknownTenantError


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    return [str(p) for p in caught.value.problems]


def test_shipped_default_is_valid() -> None:
    policy = default_policy()
    assert policy.tenant == "default"
    assert policy.limits.timeout is not None and policy.generation.temperature == 0.0


def test_extends_merges_nested_fields_and_never_inherits_the_tenant(tmp_path: Path) -> None:
    write(tmp_path, "base.yaml", "extends: default\nbudget: 3.0\nlimits:\n  burst: 4\n")
    path = write(tmp_path, "acme.yaml", "extends: base\nlimits:\n  requests_per_second: 2\n")
    policy = load_policy(path)
    assert policy.tenant == "acme"  # the file's stem, not base's or default's
    assert policy.budget == 3.0  # from base
    assert policy.limits.burst == 4 and policy.limits.requests_per_second == 2
    assert policy.limits.max_input_tokens == default_policy().limits.max_input_tokens


def test_budget_and_search_reach_the_tenant_policy(tmp_path: Path) -> None:
    strict = load_policy(
        write(
            tmp_path,
            "a.yaml",
            "extends: default\nbudget: 2.0\nsearch:\n  width: 8\n  critic: false\n",
        )
    )
    tenant = TenantPolicy.from_policy(strict)
    assert tenant.budget == 2.0 and tenant.search is not None
    assert (tenant.search.width, tenant.search.score) == (8, "augmented")
    off = load_policy(write(tmp_path, "b.yaml", "extends: default\nsearch: {enabled: false}\n"))
    assert TenantPolicy.from_policy(off).search is None
    shipped = TenantPolicy.from_policy(default_policy())
    assert shipped.search == TenantPolicy().search and shipped.budget == TenantPolicy().budget


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("extends: default\nbudget: lots\n", ":2: budget: Input should be a valid number"),
        ("extends: default\nbudget: -1\n", ":2: budget: Input should be greater than or equal"),
        ("extends: default\nlimits:\n  burst: 2\n  burts: 3\n", ":4: limits.burts: unknown field"),
        ("extends: default\nbudget: [1\n", "invalid YAML"),
        ("extends: nowhere\n", "extends: no policy file"),
        ("- just\n- a list\n", "must be a mapping"),
        ("extends: default\nrefusal_text: '  '\n", "refusal_text: Value error, must not be blank"),
        ("extends: default\ngate:\n  target_fpr: 1.5\n", "gate.target_fpr: Input should be less"),
        ("extends: default\ngate:\n  target_fpr: 0.1\n  threshold: 2\n", "not both"),
        ("extends: default\nsearch:\n  samples: 0\n", ":3: search.samples: Input should be"),
    ],
)
def test_bad_policy_names_file_line_and_field(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    found = problems_of(path)
    assert any(str(path) in p and needle in p for p in found), found


def test_cyclic_extends_and_missing_file_are_errors(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "extends: b\n")
    write(tmp_path, "b.yaml", "extends: a\n")
    assert any(
        "cyclic extends: a.yaml -> b.yaml -> a.yaml" in p for p in problems_of(tmp_path / "a.yaml")
    )
    assert any("no such file" in p for p in problems_of(tmp_path / "missing.yaml"))


def test_store_keeps_the_last_good_policy_on_a_broken_edit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, "acme.yaml", "extends: default\nrefusal_text: first\n")
    store = PolicyStore(tmp_path, poll=0.0)
    assert store.get("acme").refusal_text == "first"
    time.sleep(0.01)
    path.write_text("extends: default\nrefusal_text: second\nbudget: -5\n")
    with caplog.at_level(logging.ERROR):
        assert store.get("acme").refusal_text == "first"  # the bad edit is rejected
    assert any("budget" in r.getMessage() and "last good" in r.getMessage() for r in caplog.records)
    path.write_text("extends: default\nrefusal_text: third\n")
    os.utime(path, (time.time() + 5, time.time() + 5))  # a distinct mtime on coarse clocks
    assert store.get("acme").refusal_text == "third"  # a good edit is picked up
    assert store.problems == []


def test_store_refuses_to_start_on_a_bad_folder_and_names_unknown_tenants(tmp_path: Path) -> None:
    write(tmp_path, "bad.yaml", "tenant: 'has space'\n")
    with pytest.raises(PolicyError, match="tenant"):
        PolicyStore(tmp_path)
    (tmp_path / "bad.yaml").unlink()
    write(tmp_path, "acme.yaml", "extends: default\n")
    store = PolicyStore(tmp_path)
    with pytest.raises(UnknownTenantError, match=r"unknown tenant 'other'.*acme"):
        store.get("other")
    assert PolicyStore(tmp_path, fallback_to_default=True).get("other").tenant == "default"


def test_json_schema_lists_every_section() -> None:
    schema = Policy.model_json_schema()
    for key in ("budget", "gate", "steering", "search", "generation", "limits", "fail_mode"):
        assert key in schema["properties"]
    assert schema["additionalProperties"] is False


def test_check_reports_every_bad_file(tmp_path: Path) -> None:
    write(tmp_path, "ok.yaml", "extends: default\n")
    write(tmp_path, "wrong.yaml", "extends: default\nsearch:\n  beams: 0\n")
    write(tmp_path, "twin.yaml", "extends: default\ntenant: ok\n")
    policies, problems = check_policies(tmp_path)
    assert set(policies) == {"ok"}
    text = "\n".join(map(str, problems))
    assert "wrong.yaml:3: search.beams" in text and "twin.yaml" in text


def test_cli_policy_check_and_schema(tmp_path: Path) -> None:
    write(tmp_path, "ok.yaml", "extends: default\n")
    run = [sys.executable, "-m", "guardrail.cli", "policy"]
    good = subprocess.run([*run, "check", str(tmp_path)], capture_output=True, text=True)
    assert good.returncode == 0 and "ok: ok" in good.stdout
    write(tmp_path, "bad.yaml", "extends: default\nbudget: -1\n")
    bad = subprocess.run([*run, "check", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "bad.yaml:2: budget" in bad.stderr
    schema = subprocess.run([*run, "schema"], capture_output=True, text=True, check=True)
    assert json.loads(schema.stdout)["title"] == "Policy"


# --- per-tenant application (tiny model: mechanics only) -------------------------------------


@pytest.fixture
def two_tenants(tmp_path: Path) -> Path:
    write(
        tmp_path,
        "strict.yaml",
        "extends: default\non_fire: refuse\nrefusal_text: STRICT SAYS NO\n"
        "gate:\n  threshold: -1.0e9\n"
        "generation:\n  max_new_tokens: 3\nlimits:\n  requests_per_second: 4\n  burst: 1\n",
    )
    write(
        tmp_path,
        "lenient.yaml",
        "extends: default\nrefusal_text: LENIENT SAYS NO\ngate:\n  threshold: 1.0e9\n"
        "generation:\n  max_new_tokens: 6\nlimits:\n  max_input_tokens: 64\n",
    )
    return tmp_path


@pytest.fixture(scope="module")
def tiny_llama() -> Any:
    return _tiny("llama")


def _guard(lm: Any, folder: Path) -> Guard:
    return Guard(worker=LocalWorker(lm, hand_calibration(lm)), policies=folder)


def test_tenant_isolation_in_a_mixed_concurrent_batch(tiny_llama: Any, two_tenants: Path) -> None:
    """Every request gets its own tenant's threshold, refusal text and token budget."""
    guard = _guard(tiny_llama, two_tenants)

    async def run() -> list[Any]:
        calls = [("strict" if i % 2 else "lenient", f"prompt number {i}") for i in range(8)]
        answers = await asyncio.gather(*(guard.generate(p, tenant=t) for t, p in calls))
        return list(zip(calls, answers, strict=True))

    try:
        for (tenant, _), answer in asyncio.run(run()):
            assert answer.decision.tenant == tenant
            if tenant == "strict":  # threshold -1e9: every prompt fires and is refused
                assert answer.decision.fired and answer.text == "STRICT SAYS NO"
                assert answer.decision.threshold == -1.0e9
            else:  # threshold +1e9: never fires, plain answer within 6 tokens
                assert not answer.decision.fired and answer.decision.path == "plain"
                assert answer.text != "LENIENT SAYS NO" and answer.decision.new_tokens <= 6
    finally:
        guard.close()


def test_rate_limits_per_tenant(tiny_llama: Any, two_tenants: Path) -> None:
    """strict: 4 requests/s, burst 1, so 5 requests take >= 1 s; lenient: unlimited."""
    guard = _guard(tiny_llama, two_tenants)

    async def timed(tenant: str) -> float:
        started = time.monotonic()
        await asyncio.gather(*(guard.generate("hi", tenant=tenant) for _ in range(5)))
        return time.monotonic() - started

    try:
        assert asyncio.run(timed("strict")) >= 1.0
        assert asyncio.run(timed("lenient")) < 1.0
    finally:
        guard.close()


def test_max_input_tokens_and_unknown_tenant(tiny_llama: Any, two_tenants: Path) -> None:
    from guardrail.errors import InputError

    guard = _guard(tiny_llama, two_tenants)
    try:
        with pytest.raises(InputError, match="the limit is 64"):
            guard.generate_sync("word " * 200, tenant="lenient")
        with pytest.raises(UnknownTenantError, match="nobody"):
            guard.generate_sync("hi", tenant="nobody")
    finally:
        guard.close()


def test_target_fpr_sets_the_tenant_threshold_on_held_aside_harmless_scores(
    tiny_llama: Any, tmp_path: Path
) -> None:
    write(tmp_path, "picky.yaml", "extends: default\ngate:\n  target_fpr: 0.1\n")
    calibration = hand_calibration(tiny_llama)
    calibration.harmless_scores = torch.arange(100.0)  # 90..99 lie above the threshold
    guard = Guard(worker=LocalWorker(tiny_llama, calibration), policies=tmp_path)
    try:
        assert guard.request("hi", tenant="picky").gate_threshold == 89.0
        assert guard.request("hi", tenant="default").gate_threshold is None  # the calibrated one
        answer = guard.generate_sync("hi", tenant="picky")
        assert answer.decision.threshold == 89.0 and not answer.decision.fired
        restored = Calibration.from_artifacts(calibration.to_artifacts())
        assert restored.threshold_at(0.1) == 89.0
    finally:
        guard.close()
    calibration.harmless_scores = None  # artifacts from before the field: a clear error
    old = Guard(worker=LocalWorker(tiny_llama, calibration, start=False), policies=tmp_path)
    try:  # resolved when the policy loads; the error is that tenant's alone
        with pytest.raises(CalibrationError, match="recalibrate"):
            old.request("hi", tenant="picky")
        assert old.request("hi", tenant="default").gate_threshold is None
    finally:
        old.close(drain=False)


def test_tenant_steering_applies_per_row_in_a_mixed_batch(tiny_llama: Any, tmp_path: Path) -> None:
    """Each fired row is steered with its own tenant's layers and strength, in one batch, and
    answers exactly as it does alone; a setting the calibration cannot serve is an error."""
    common = "extends: default\non_fire: steer\ngate:\n  threshold: -1.0e9\n"
    write(tmp_path, "mild.yaml", common + "steering:\n  strength: 0.5\n")
    write(tmp_path, "deep.yaml", common + "steering:\n  layers: [0, 1]\n  strength: 8.0\n")
    write(tmp_path, "plain.yaml", "extends: default\ngate:\n  threshold: 1.0e9\n")
    write(tmp_path, "broken.yaml", common + "steering:\n  layers: [99]\n")
    guard = Guard(
        worker=LocalWorker(tiny_llama, hand_calibration(tiny_llama), max_wait=0.2),
        policies=tmp_path,
    )
    calls = [(t, f"tell me about number {i}") for i in range(3) for t in ("mild", "deep", "plain")]

    async def together() -> list[Any]:
        return list(
            await asyncio.gather(*(guard.generate(p, tenant=t, max_new_tokens=8) for t, p in calls))
        )

    try:
        mixed = asyncio.run(together())
        assert guard.worker.stats.max_rows > 3  # type: ignore[attr-defined]
        for (tenant, prompt), answer in zip(calls, mixed, strict=True):
            steering = answer.decision.steering
            if tenant == "plain":
                assert answer.decision.path == "plain" and steering is None
            else:
                assert answer.decision.path == "steered"
                expected = {"mild": ([1], 0.5), "deep": ([0, 1], 8.0)}[tenant]
                assert (steering["layers"], steering["strength"]) == expected
            alone = guard.generate_sync(prompt, tenant=tenant, max_new_tokens=8)
            assert alone.text == answer.text, tenant
        texts = {t: a.text for (t, _), a in zip(calls, mixed, strict=True)}
        assert len(set(texts.values())) == 3  # the three settings really differ
        with pytest.raises(CalibrationError, match=r"layers \[99\]"):
            guard.request("hi", tenant="broken")
    finally:
        guard.close()


def test_guard_without_policies_applies_the_shipped_default(tiny_llama: Any) -> None:
    """What the docs promise for `Guard()`: policies/default.yaml, found as package data."""
    from guardrail.tenants.schema import default_policy_file

    assert default_policy_file().name == "default.yaml" and default_policy_file().is_file()
    guard = Guard(worker=LocalWorker(tiny_llama, hand_calibration(tiny_llama), start=False))
    try:
        policy = guard.policy("default")
        assert policy == TenantPolicy.from_policy(load_policy(default_policy_file()))
        assert (policy.timeout, policy.max_input_tokens) == (120.0, 4096)
        assert policy.sampling.max_new_tokens == 256
        request = guard.request("Hi")
        assert request.deadline is not None and request.max_input_tokens == 4096
        assert request.sampling.max_new_tokens == 256
    finally:
        guard.close(drain=False)
