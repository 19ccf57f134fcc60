"""Tenants resolved once per policy load: the refusal text is costed when its policy loads, not
per request; a folder's change check and reload run off the caller's thread (never on an
event loop); a reload that cannot be resolved keeps the last good tenant in force."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_worker import ScriptedCost, hand_calibration

from conftest import _tiny
from guardrail.budget.search import Scorers
from guardrail.serve.guard import Guard
from guardrail.serve.worker import LocalWorker
from guardrail.tenants.store import PolicyStore, TenantPolicy


@pytest.fixture(scope="module")
def llama() -> Any:
    return _tiny("llama")


def _wait_for(check: Any, seconds: float = 10.0) -> bool:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_refusal_is_costed_once_per_policy_load(llama: Any) -> None:
    cost = ScriptedCost()
    worker = LocalWorker(llama, hand_calibration(llama), scorers=Scorers(cost), start=False)
    policy = TenantPolicy(refusal_text="NO THANKS", gate_threshold=1e9, search=None)
    guard = Guard(worker=worker, policies={"default": policy})
    try:
        assert cost.calls == [["NO THANKS"]]  # checked against the budget as it loaded
        resolved = guard.tenants.get("default")
        assert (resolved.refusal_cost, resolved.budget) == (0.0, policy.budget)
        for _ in range(5):
            request = guard.request("Hi")
            assert request.budget == policy.budget and request.refusal_text == "NO THANKS"
        assert cost.calls == [["NO THANKS"]]  # five requests, no further cost call
        assert guard.tenants.get("default") is resolved  # one object, throttler and all
    finally:
        guard.close(drain=False)


def test_reload_runs_off_the_callers_thread_and_keeps_the_last_good(
    llama: Any, tmp_path: Path
) -> None:
    path = tmp_path / "acme.yaml"
    path.write_text("extends: default\nrefusal_text: FIRST\n")
    cost = ScriptedCost()  # "OVER" costs 9, over the default budget of 5
    worker = LocalWorker(llama, hand_calibration(llama), scorers=Scorers(cost), start=False)
    store = PolicyStore(tmp_path, poll=0.0)
    checked_on: list[str] = []
    check = store.check

    def recording_check() -> None:
        checked_on.append(threading.current_thread().name)
        check()

    store.check = recording_check  # type: ignore[method-assign]
    guard = Guard(worker=worker, policies=store)
    try:
        assert guard.policy("acme").refusal_text == "FIRST"

        path.write_text("extends: default\nrefusal_text: SECOND\n")
        assert _wait_for(lambda: guard.policy("acme").refusal_text == "SECOND")
        assert checked_on and threading.current_thread().name not in checked_on

        # Requests (here: policy lookups) are what start a due change check.
        path.write_text("refusal_text: [unclosed\n")  # invalid YAML
        assert _wait_for(lambda: bool(guard.policy("acme") and store.problems))
        assert guard.request("Hi", tenant="acme").refusal_text == "SECOND"

        path.write_text("extends: default\nrefusal_text: OVER\n")  # a refusal over budget
        assert _wait_for(lambda: bool(guard.policy("acme")) and ["OVER"] in cost.calls)
        time.sleep(0.05)  # the resolution that failed has finished
        assert guard.request("Hi", tenant="acme").refusal_text == "SECOND"
    finally:
        guard.close(drain=False)
