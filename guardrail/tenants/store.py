"""`PolicyStore`: the tenants' policies from a folder, reloaded on change, last good kept.

A running guard must never lose a working policy to a bad edit: each file is validated on
its own, and a file that fails keeps its tenant's last good policy in force (the problem is
logged once per change). Reloads are cheap mtime checks, at most every `poll` seconds, done
by whoever asks for a policy (no watcher thread to manage).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from asyncio_throttle.throttler import Throttler

from guardrail.budget.scoring import DEFAULT_BUDGET
from guardrail.budget.search import SearchSettings
from guardrail.decision import DEFAULT_REFUSAL, OnFire
from guardrail.errors import InputError
from guardrail.runtime.forward import Sampling
from guardrail.tenants.schema import (
    Policy,
    PolicyError,
    Problem,
    default_policy,
    load_policy,
    policy_files,
)

log = logging.getLogger(__name__)


class UnknownTenantError(InputError):
    """The request names a tenant that has no policy."""


@dataclass(frozen=True)
class TenantPolicy:
    """What one tenant gets at run time: the `Policy` file's fields the Guard applies.

    The field defaults here are for tenants built in code and set no deadline or input limit;
    the shipped `policies/default.yaml` (what `Guard()` applies) is `TenantPolicy.default()`.
    """

    on_fire: OnFire = "auto"
    refusal_text: str = DEFAULT_REFUSAL
    timeout: float | None = None  # seconds from submission
    sampling: Sampling = field(default_factory=Sampling)
    allow_unguarded: bool = False  # may a caller switch the guard off (benchmarks, the CLI)?
    gate_threshold: float | None = None  # None: from gate_target_fpr, or the calibrated one
    gate_target_fpr: float | None = None
    steering_source: str | None = None  # None for each: the calibrated choice
    steering_layers: tuple[int, ...] | None = None
    steering_strength: float | None = None
    max_input_tokens: int | None = None
    requests_per_second: float | None = None  # None: unlimited
    burst: int = 1
    fail_mode: Literal["refuse", "error"] = "refuse"  # on an internal error
    budget: float = DEFAULT_BUDGET  # applied when the worker has a cost model
    cost_model: str | None = None  # one the worker offers (latent, minilm); None: its default
    search: SearchSettings | None = field(default_factory=SearchSettings)  # None: refuse

    @classmethod
    def from_policy(cls, policy: Policy) -> TenantPolicy:
        gen, limits, steer = policy.generation, policy.limits, policy.steering
        return cls(
            on_fire=policy.on_fire,
            refusal_text=policy.refusal_text,
            timeout=limits.timeout,
            sampling=Sampling(
                max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p
            ),
            allow_unguarded=policy.allow_unguarded,
            gate_threshold=policy.gate.threshold,
            gate_target_fpr=policy.gate.target_fpr,
            steering_source=None if steer.source == "auto" else steer.source,
            steering_layers=None if steer.layers == "auto" else tuple(steer.layers),
            steering_strength=None if steer.strength == "auto" else steer.strength,
            max_input_tokens=limits.max_input_tokens,
            requests_per_second=limits.requests_per_second,
            burst=limits.burst,
            fail_mode=policy.fail_mode,
            budget=policy.budget,
            cost_model=policy.cost_model,
            search=SearchSettings(
                width=policy.search.width,
                samples=policy.search.samples,
                beams=policy.search.beams,
                rounds=policy.search.rounds,
                penalty=policy.search.penalty,
                temperature=policy.search.temperature,
                score="critic" if policy.search.critic else "augmented",
            )
            if policy.search.enabled
            else None,
        )

    @classmethod
    def default(cls) -> TenantPolicy:
        """The shipped default policy file (`guardrail.policies/default.yaml`), as documented."""
        return cls.from_policy(default_policy())

    def throttler(self) -> Throttler | None:
        """`burst` requests per `burst / requests_per_second` seconds: that rate on average."""
        if self.requests_per_second is None:
            return None
        return Throttler(rate_limit=self.burst, period=self.burst / self.requests_per_second)


class PolicyStore:
    """Policies by tenant. `directory=None`: only the shipped default policy.

    `fallback_to_default`: a tenant without a file gets the `default` tenant's policy
    instead of an `UnknownTenantError` (only when the deployment says so).
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        *,
        fallback_to_default: bool = False,
        poll: float = 1.0,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fallback_to_default = fallback_to_default
        self.poll = poll
        self.problems: list[Problem] = []
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[str, float, int], ...] | None = None
        self._checked = 0.0
        self._by_file: dict[Path, Policy] = {}
        self._policies: dict[str, Policy] = {}
        self.reload(strict=True)

    def get(self, tenant: str) -> Policy:
        self._maybe_reload()
        policy = self._policies.get(tenant)
        if policy is None and self.fallback_to_default:
            policy = self._policies.get("default")
        if policy is None:
            known = ", ".join(sorted(self._policies)) or "none"
            raise UnknownTenantError(f"unknown tenant {tenant!r} (known: {known})")
        return policy

    def tenants(self) -> list[str]:
        self._maybe_reload()
        return sorted(self._policies)

    def reload(self, *, strict: bool = False) -> list[Problem]:
        """Re-read every file. `strict` (at start): any problem raises `PolicyError`, so a
        deployment never starts on a half-valid folder. Otherwise a bad file keeps its last
        good policy and its problems are logged and returned."""
        with self._lock:
            self._checked = time.monotonic()
            if self.directory is None:
                self._policies = {"default": default_policy()}
                return []
            files = policy_files(self.directory)
            self._stamp = _stamp(files)
            by_file: dict[Path, Policy] = {}
            problems: list[Problem] = []
            for path in files:
                try:
                    by_file[path] = load_policy(path)
                except PolicyError as exc:
                    problems.extend(exc.problems)
                    if path in self._by_file:  # keep the last good one in force
                        by_file[path] = self._by_file[path]
            policies: dict[str, Policy] = {}
            for path, policy in by_file.items():
                if policy.tenant in policies:
                    message = f"tenant {policy.tenant!r} is defined twice; this file is ignored"
                    problems.append(Problem(str(path), None, "tenant", message))
                    continue
                policies[policy.tenant] = policy
            if "default" not in policies:
                policies["default"] = default_policy()
            if problems and strict:
                raise PolicyError(problems)
            for problem in problems:
                if problem not in self.problems:
                    log.error("policy rejected, last good policy stays in force: %s", problem)
            self.problems = problems
            self._by_file, self._policies = by_file, policies
            return problems

    def due(self) -> bool:
        """Whether the folder is due for its change check (no I/O: a clock read)."""
        return self.directory is not None and time.monotonic() - self._checked >= self.poll

    def policies(self) -> dict[str, Policy]:
        """The policies in force, by tenant (no I/O)."""
        return dict(self._policies)

    def check(self) -> None:
        """Reload if a file changed (a `stat` of each); a vanished folder keeps what we have."""
        if self.directory is None:
            return
        try:
            changed = _stamp(policy_files(self.directory)) != self._stamp
        except PolicyError as exc:  # the folder vanished: keep serving what we have
            log.error("policy folder unreadable, policies stay in force: %s", exc)
            self._checked = time.monotonic()
            return
        if changed:
            self.reload()
        else:
            self._checked = time.monotonic()

    def _maybe_reload(self) -> None:
        if self.due():
            self.check()


def _stamp(files: list[Path]) -> tuple[tuple[str, float, int], ...]:
    out = []
    for path in files:
        try:
            info = path.stat()
        except OSError:
            continue
        out.append((str(path), info.st_mtime, info.st_size))
    return tuple(out)


__all__ = ["PolicyStore", "UnknownTenantError"]
