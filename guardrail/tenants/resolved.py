"""`ResolvedTenant`: a tenant's policy turned, once per load, into what a request needs.

A policy file says "the calibrated threshold at 2% false positives" or "steering: auto"; the
Guard needs numbers. Resolving reads the calibration (gate threshold, steering setting and its
vectors), checks the refusal text against the budget under the tenant's cost model (a cost
call) and makes the tenant's throttler. That work happens when a policy loads or reloads, not
per request, and never on an event loop: `Tenants.get` is a lookup, and a policy folder that
is due for its change check is re-read and re-resolved on a helper thread while requests go
on with what is in force. A policy that fails to resolve (an unknown steering layer, a
refusal over budget) is an error for that tenant only, and never replaces a good one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from asyncio_throttle.throttler import Throttler

from guardrail.budget.search import Scorers, SearchSettings
from guardrail.errors import CalibrationError, GuardrailError, InputError
from guardrail.gate.artifact import Calibration, SteeringSetting
from guardrail.tenants.schema import Policy, PolicyError, Problem
from guardrail.tenants.store import PolicyStore, TenantPolicy, UnknownTenantError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ResolvedTenant:
    """One tenant as the Guard applies it (`policy` is what its file said)."""

    name: str
    policy: TenantPolicy
    gate_threshold: float | None  # None: the calibrated one
    steering: SteeringSetting | None  # None: the calibrated one
    refusal_cost: float | None  # the refusal text's cost (empty prompt); None: no cost model
    budget: float | None  # on the cost model's scale; None: the worker has no cost model
    search: SearchSettings | None  # None: an answer over budget ends with the refusal text
    cost_model: str | None
    throttler: Throttler | None  # None: no rate limit

    @property
    def refusal_text(self) -> str:
        return self.policy.refusal_text


def resolve(
    name: str, policy: TenantPolicy, calibration: Calibration | None, scorers: Scorers | None
) -> ResolvedTenant:
    """Blocking (a cost call, steering vectors): call it off the event loop."""
    budget, refusal_cost = _budget(name, policy, scorers)
    return ResolvedTenant(
        name=name,
        policy=policy,
        gate_threshold=_gate_threshold(policy, calibration),
        steering=_steering(policy, calibration),
        refusal_cost=refusal_cost,
        budget=budget,
        search=policy.search if budget is not None else None,
        cost_model=policy.cost_model if budget is not None else None,
        throttler=policy.throttler(),
    )


def _budget(
    name: str, policy: TenantPolicy, scorers: Scorers | None
) -> tuple[float | None, float | None]:
    """The budget (None without a cost model) and the refusal text's cost, which must be
    within it: the refusal is the text every fail-closed path answers with."""
    if scorers is None:
        return None, None
    try:
        cost = scorers.for_cost(policy.cost_model).cost
    except InputError as exc:
        raise PolicyError([Problem(f"tenant {name!r}", None, "cost_model", str(exc))]) from None
    refusal_cost = float(cost.cost([""], [policy.refusal_text])[0])
    if refusal_cost > policy.budget:
        message = (
            f"costs {refusal_cost:.2f} under the cost model, over the budget "
            f"{policy.budget}: write a plainer refusal or raise the budget"
        )
        raise PolicyError([Problem(f"tenant {name!r}", None, "refusal_text", message)])
    return policy.budget, refusal_cost


def _calibration(calibration: Calibration | None, needs: str) -> Calibration:
    if calibration is None:
        raise CalibrationError(f"{needs} needs a calibrated worker")
    return calibration


def _gate_threshold(policy: TenantPolicy, calibration: Calibration | None) -> float | None:
    if policy.gate_threshold is not None or policy.gate_target_fpr is None:
        return policy.gate_threshold
    return _calibration(calibration, "gate.target_fpr").threshold_at(policy.gate_target_fpr)


def _steering(policy: TenantPolicy, calibration: Calibration | None) -> SteeringSetting | None:
    """The tenant's steering setting, its `auto` parts from calibration; None: all auto."""
    given = (policy.steering_source, policy.steering_layers, policy.steering_strength)
    if given == (None, None, None):
        return None
    calibration = _calibration(calibration, "a tenant's steering setting")
    base = calibration.steering
    if base is None and None in given:
        raise CalibrationError(
            "calibration chose no steering setting: a tenant's steering needs source, "
            "layers and strength"
        )
    fallback = base or SteeringSetting("", (), 0.0)  # all three given when no base
    strength = policy.steering_strength
    setting = SteeringSetting(
        policy.steering_source or fallback.source,
        policy.steering_layers or fallback.layers,
        fallback.strength if strength is None else strength,
    )
    calibration.steering_vectors(setting)  # unknown source or layer: an error here
    return setting


class Tenants:
    """The resolved tenants of a policy folder (`PolicyStore`) or of policies set in code.

    `get` never blocks on I/O: a folder due for its change check is re-read on a helper
    thread and the tenants whose policy changed are resolved again there. Policies in code
    are resolved here, at construction (and again if the mapping's entry is replaced).
    """

    def __init__(
        self,
        source: PolicyStore | Mapping[str, TenantPolicy],
        calibration: Calibration | None,
        scorers: Scorers | None,
    ) -> None:
        self.source = source
        self.calibration = calibration
        self.scorers = scorers
        self._lock = threading.Lock()
        self._refreshing = False
        self._resolved: dict[str, ResolvedTenant] = {}
        self._errors: dict[str, tuple[object, GuardrailError]] = {}  # policy -> its error
        self._origin: dict[str, object] = {}  # tenant -> the policy object it was resolved from
        self._resolve_all()

    def get(self, tenant: str) -> ResolvedTenant:
        """The tenant in force now; its resolution error if it never resolved;
        `UnknownTenantError` if it has no policy."""
        name = tenant
        if isinstance(self.source, PolicyStore):
            if self.source.due():
                self._refresh_in_background()
        else:
            policy = self.source.get(tenant)
            seen = (self._origin.get(tenant), self._failed(tenant))
            if policy is not None and all(policy is not old for old in seen):
                self._resolve_one(tenant, policy, policy)  # replaced in code since
        if name not in self._resolved and name not in self._errors:
            fallback = isinstance(self.source, PolicyStore) and self.source.fallback_to_default
            if not fallback or "default" not in self._resolved:
                known = ", ".join(sorted({*self._resolved, *self._errors})) or "none"
                raise UnknownTenantError(f"unknown tenant {tenant!r} (known: {known})")
            name = "default"
        resolved = self._resolved.get(name)
        if resolved is None:
            raise self._errors[name][1]
        return resolved

    def refresh(self) -> None:
        """Re-read a changed policy folder and resolve what changed (blocking)."""
        if isinstance(self.source, PolicyStore):
            self.source.check()
        self._resolve_all()

    def _refresh_in_background(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.refresh()
            except Exception:
                log.exception("refreshing the tenant policies failed; the ones in force stay")
            finally:
                with self._lock:
                    self._refreshing = False

        threading.Thread(target=run, name="guardrail-policies", daemon=True).start()

    def _resolve_all(self) -> None:
        if isinstance(self.source, PolicyStore):
            items: dict[str, tuple[object, TenantPolicy | None]] = {
                name: (policy, None) for name, policy in self.source.policies().items()
            }
        else:
            items = {name: (policy, policy) for name, policy in self.source.items()}
        for name, (origin, policy) in items.items():
            if origin is self._origin.get(name) or origin is self._failed(name):
                continue  # unchanged since it was resolved
            if policy is None:
                assert isinstance(origin, Policy)
                policy = TenantPolicy.from_policy(origin)
            self._resolve_one(name, origin, policy)
        for gone in set(self._resolved) - set(items):  # its file was removed
            self._resolved.pop(gone, None)
            self._origin.pop(gone, None)
            self._errors.pop(gone, None)

    def _failed(self, tenant: str) -> object:
        """The policy object whose resolution failed last for this tenant, if any."""
        return self._errors[tenant][0] if tenant in self._errors else None

    def _resolve_one(self, name: str, origin: object, policy: TenantPolicy) -> None:
        try:
            resolved = resolve(name, policy, self.calibration, self.scorers)
        except GuardrailError as exc:
            self._errors[name] = (origin, exc)
            if name in self._resolved:
                log.error("tenant %r: policy rejected, the last good one stays: %s", name, exc)
            return
        self._errors.pop(name, None)
        self._resolved[name], self._origin[name] = resolved, origin


__all__ = ["ResolvedTenant", "Tenants", "resolve"]
