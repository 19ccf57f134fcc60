"""`Guard`: the async entry point, with sync twins for scripts.

    guard = Guard()                       # the embedded default model and its calibration
    result = await guard.generate([{"role": "user", "content": "Hi"}], max_new_tokens=64)
    result.text, result.decision.path
    async for chunk in guard.stream("Tell me a story"):
        print(chunk, end="")

The event loop never waits on the model: requests go to a `Worker` (a thread owning the model)
and come back through `loop.call_soon_threadsafe`. Every entry point runs one `Exchange`
(guardrail/serve/exchange.py: rate limit, submit, deadline, `fail_mode`, cancel); the sync
twins (`generate_sync`, `stream_sync`) run it on a private event loop thread, so a script and
an async service share one code path, and the twins also work inside a running event loop (a
notebook cell), blocking only the calling thread. Deadlines fail closed: when one passes, the
answer is the tenant's refusal text with path "timeout", never unguarded text. Internal
errors follow the tenant's `fail_mode` at every entry point: `refuse` answers with the
refusal text (a stream ends with it), `error` raises.

Tenants are resolved once per policy load (guardrail/tenants/resolved.py): building a request
reads no file and calls no model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from guardrail.decision import Answer
from guardrail.errors import InputError
from guardrail.gate.artifact import Calibration
from guardrail.runtime.forward import Sampling
from guardrail.runtime.model import LanguageModel, Message
from guardrail.serve.exchange import Exchange, SyncExchange, run_sync
from guardrail.serve.worker import LocalWorker, Request, Worker
from guardrail.tenants.resolved import ResolvedTenant, Tenants
from guardrail.tenants.store import PolicyStore, TenantPolicy

GuardResult = Answer  # `.text` and `.decision` (the decision record)
GuardStream = Exchange  # async iterator over released chunks; `.result` at the end
SyncGuardStream = SyncExchange

_LANGCHAIN_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}
_OVERRIDES = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "timeout",
        "guarded",
        "stop",
        "response_prefix",
        "probe",
    }
)


def to_messages(messages: Any) -> list[Message] | str:
    """Accept a string, role/content dicts, or LangChain messages (anything with `.type`)."""
    if isinstance(messages, str):
        if not messages.strip():
            raise InputError("the prompt is empty")
        return messages
    if not isinstance(messages, Sequence) or not messages:
        raise InputError("messages must be a non-empty string or list of messages")
    out: list[Message] = []
    for i, message in enumerate(messages):
        if isinstance(message, Mapping):
            role, content = message.get("role"), message.get("content")
        else:
            kind = getattr(message, "type", None)
            role, content = _LANGCHAIN_ROLES.get(str(kind), kind), getattr(message, "content", None)
        if not isinstance(role, str) or not isinstance(content, str):
            raise InputError(f"message {i} needs a string role and string content")
        out.append({"role": role, "content": content})
    return out


class Guard:
    """Resolve the tenant's policy, hand the request to the worker, fail closed on deadline."""

    def __init__(
        self,
        lm: LanguageModel | None = None,
        calibration: Calibration | None = None,
        *,
        worker: Worker | None = None,
        policies: PolicyStore | Mapping[str, TenantPolicy] | str | Path | None = None,
        redis_url: str | None = None,
        cost_model: str | None = None,
        **worker_options: Any,
    ) -> None:
        """With no arguments: the embedded default model and its (stored or new) calibration.

        `policies`: a folder of tenant policy files (or a `PolicyStore` over one, reloaded on
        change), or tenant policies in code; default: the shipped `default` policy only
        (`policies/default.yaml`: 120 s deadline, 4096 input tokens, 256 new tokens).
        `redis_url` (default: `GUARDRAIL_REDIS_URL`): where calibration artifacts and cost
        scores are shared. `cost_model`: `minilm` (the default), `latent`, or a
        sequence-classification model (see `load_scorers`). `worker_options` go to
        `LocalWorker` (max_batch, max_wait,
        max_queue, chunk_tokens, scorers, join); without `scorers` the calibrated cost model,
        reward and critic are loaded (or calibrated once).
        """
        if worker is None:
            if lm is None:
                from guardrail.runtime.model import load_model

                lm = load_model()
            if calibration is None:
                from guardrail.calibrate.store import default_store, load_or_calibrate

                calibration = load_or_calibrate(lm, store=default_store(redis_url), progress=False)
            if "scorers" not in worker_options:
                from guardrail.calibrate.store import load_scorers

                worker_options["scorers"] = load_scorers(
                    lm, calibration, redis_url=redis_url, cost_model=cost_model
                )
            worker = LocalWorker(lm, calibration, **worker_options)
        self.worker = worker
        if isinstance(policies, (str, Path)):
            policies = PolicyStore(policies)
        self.store = policies if isinstance(policies, PolicyStore) else None
        self.policies: dict[str, TenantPolicy] = {}
        if not isinstance(policies, PolicyStore):
            self.policies = dict(policies or {"default": TenantPolicy.default()})
        source = self.store if self.store is not None else self.policies
        self.tenants = Tenants(source, worker.calibration, worker.scorers)

    def policy(self, tenant: str) -> TenantPolicy:
        """The tenant's policy in force now; `UnknownTenantError` if it has none."""
        return self.tenants.get(tenant).policy

    def request(self, messages: Any, tenant: str = "default", **overrides: Any) -> Request:
        """Build the worker request; errors in the input raise `InputError` right here."""
        return self._request(tenant, self.tenants.get(tenant), messages, overrides)

    def _request(
        self, tenant: str, resolved: ResolvedTenant, messages: Any, overrides: Mapping[str, Any]
    ) -> Request:
        """`tenant` as asked for (its policy may be the default's, by the store's fallback)."""
        policy = resolved.policy
        unknown = set(overrides) - _OVERRIDES
        if unknown:
            raise InputError(f"unknown options {sorted(unknown)}; known: {sorted(_OVERRIDES)}")
        base = policy.sampling
        try:
            sampling = Sampling(
                max_new_tokens=overrides.get("max_new_tokens", base.max_new_tokens),
                temperature=overrides.get("temperature", base.temperature),
                top_p=overrides.get("top_p", base.top_p),
                seed=overrides.get("seed", base.seed),
            )
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        guarded = bool(overrides.get("guarded", True))
        if not guarded and not policy.allow_unguarded:
            raise InputError(f"tenant {tenant!r} may not switch the guard off")
        timeout = overrides.get("timeout", policy.timeout)
        stop = overrides.get("stop") or ()
        if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
            raise InputError(f"stop must be a list of non-empty strings, got {stop!r}")
        prefix = overrides.get("response_prefix", "")
        if not isinstance(prefix, str):
            raise InputError(f"response_prefix must be a string, got {type(prefix).__name__}")
        budget = resolved.budget if guarded else None  # the guard is off
        return Request(
            chat=to_messages(messages),
            sampling=sampling,
            guarded=guarded,
            on_fire=policy.on_fire,
            refusal_text=policy.refusal_text,
            deadline=None if timeout is None else time.monotonic() + float(timeout),
            tenant=tenant,
            gate_threshold=resolved.gate_threshold,
            steering=resolved.steering,
            max_input_tokens=policy.max_input_tokens,
            response_prefix=prefix,
            probe=str(overrides.get("probe", "")),
            stop=tuple(stop),
            budget=budget,
            refusal_cost=resolved.refusal_cost if budget is not None else None,
            search=resolved.search if budget is not None else None,
            cost_model=resolved.cost_model if budget is not None else None,
        )

    def _exchange(self, messages: Any, tenant: str, overrides: Mapping[str, Any]) -> Exchange:
        resolved = self.tenants.get(tenant)
        request = self._request(tenant, resolved, messages, overrides)
        return Exchange(self.worker, resolved, request)

    async def generate(self, messages: Any, tenant: str = "default", **overrides: Any) -> Answer:
        """The answer and its decision record; cancelling the caller cancels the request."""
        return await self._exchange(messages, tenant, overrides).answer()

    def stream(self, messages: Any, tenant: str = "default", **overrides: Any) -> GuardStream:
        """Released text chunks, each after it passed the chunk check (at most one held back)."""
        return self._exchange(messages, tenant, overrides)

    def generate_sync(self, messages: Any, tenant: str = "default", **overrides: Any) -> Answer:
        """`generate` for scripts: blocks the calling thread, also inside a running event loop
        (a notebook cell, a sync callback), where only that thread waits."""
        return run_sync(self._exchange(messages, tenant, overrides).answer())

    def stream_sync(
        self, messages: Any, tenant: str = "default", **overrides: Any
    ) -> SyncGuardStream:
        """`stream` for scripts: a blocking iterator; `.result` holds the answer at its end."""
        return SyncExchange(self._exchange(messages, tenant, overrides))

    async def aclose(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; in-flight ones finish (`drain`) or fail with `ShutdownError`."""
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.worker.close(drain=drain, timeout=timeout)
        )

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        self.worker.close(drain=drain, timeout=timeout)

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Guard", "GuardResult", "GuardStream", "SyncGuardStream", "TenantPolicy", "to_messages"]
