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
from pathlib import Path

from guardrail.errors import InputError
from guardrail.policy import Policy, PolicyError, Problem, default_policy, load_policy, policy_files

log = logging.getLogger(__name__)


class UnknownTenantError(InputError):
    """The request names a tenant that has no policy."""


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

    def _maybe_reload(self) -> None:
        if self.directory is None or time.monotonic() - self._checked < self.poll:
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
