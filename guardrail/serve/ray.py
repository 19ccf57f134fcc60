"""`RayWorker`: the `Worker` seam served by a Ray Serve deployment, for scale-out.

Each Serve replica hosts one `LocalWorker` (the embedded or given model, its calibration read
from the shared artifact store: Redis when `redis_url`/`GUARDRAIL_REDIS_URL` names one, else
the local `GUARDRAIL_HOME` folder), so batching inside a replica is the `LocalWorker`'s own
scheduler, and Serve only routes whole requests to the least busy replica. A request streams
back as events, `{"chunk": text}`... then `{"answer": ...}` or `{"error": ...}`.

`submit` never blocks its caller: the handle calls run on a private event loop in a
background thread, which feeds the caller's `Sink`. `Ticket.cancel()` cancels the Serve
request; the replica's generator is cancelled in turn and cancels its `LocalWorker` ticket,
so the row leaves its batch at the next step.

Requests and answers cross the wire as plain dicts of their dataclass fields (Ray serialises
them), rebuilt field by field, so fields added to `Request`, `Sampling` or `Decision` flow
through without changes here. The deadline is the one exception: it travels as seconds
left, since monotonic clocks are per host. A replica that dies mid-request fails that
request with a `GuardrailError` (the Guard answers it with the refusal text under
`fail_mode: refuse`); it is not retried, since chunks may already have been released.

`bench/bench_ray.py` measures both (2026-11-28, SmolLM2-135M, shared 2-core CPU, 1 torch
thread per replica): 2 replicas answered 0.94-0.97x the in-process worker's requests per
second, since both cores were already busy (replicas pay off with more cores or machines);
a replica killed under load failed only its 4 requests in flight, answered nothing
unguarded, and its replacement restored the pre-kill throughput 21 s later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import threading
import time
import typing
from collections.abc import AsyncIterator
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentResponseGenerator

from guardrail import errors
from guardrail.budget.search import Scorers
from guardrail.calibrate.store import load_scorers
from guardrail.decision import Answer
from guardrail.errors import GuardrailError, OverloadedError, ShutdownError
from guardrail.gate.artifact import Calibration
from guardrail.runtime.model import EMBEDDED_DEFAULT
from guardrail.serve.worker import LocalWorker, Request, Sink, Ticket

# Passed on to the replicas, so that they read the same artifacts and never reach a hub.
# The shared key travels by file path where possible: an env var's value is visible to
# whoever can read the cluster's job specifications.
_ENV_VARS = (
    "GUARDRAIL_HOME",
    "GUARDRAIL_REDIS_URL",
    "GUARDRAIL_SHARED_KEY_FILE",
    "GUARDRAIL_SHARED_KEY",
    "TRANSFORMERS_VERBOSITY",
)


def to_dict(value: Any) -> dict[str, Any]:
    return dataclasses.asdict(value)


def from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """Rebuild dataclass `cls` from `to_dict`'s output, nested dataclass fields included."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        if isinstance(value, dict):
            hint = hints.get(name)
            kinds = [t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)]
            if kinds:
                value = from_dict(typing.cast(type, kinds[0]), value)
        values[name] = value
    return cls(**values)


def _error_event(error: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(error).__name__, "message": str(error)}}


def _remote_error(event: dict[str, Any]) -> BaseException:
    """The replica's error as the same class from guardrail.errors; others as GuardrailError."""
    kind = getattr(errors, event["type"], None)
    if isinstance(kind, type) and issubclass(kind, GuardrailError):
        return kind(event["message"])
    return GuardrailError(f"{event['type']}: {event['message']}")


class _EventSink:
    """Turns a `LocalWorker`'s callbacks (on its model thread) into events on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def _put(self, event: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def chunk(self, text: str) -> None:
        self._put({"chunk": text})

    def done(self, answer: Answer) -> None:
        self._put({"answer": to_dict(answer)})

    def fail(self, error: BaseException) -> None:
        self._put(_error_event(error))


class GuardReplica:
    """One Serve replica: a `LocalWorker` over its own copy of the model."""

    def __init__(self, model: str, redis_url: str | None, worker_options: dict[str, Any]) -> None:
        from guardrail.calibrate.store import default_store, load_or_calibrate
        from guardrail.runtime.model import load_model

        lm = load_model(model)
        calibration = load_or_calibrate(lm, store=default_store(redis_url), progress=False)
        if worker_options.get("scorers") is None:  # the calibrated cost model, from the store
            scorers = load_scorers(lm, calibration, redis_url=redis_url)
            worker_options = {**worker_options, "scorers": scorers}
        self.worker = LocalWorker(lm, calibration, **worker_options)

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request's events; cancelling this generator cancels the request."""
        sink = _EventSink(asyncio.get_running_loop())
        left = payload.get("deadline")
        if left is not None:
            payload = {**payload, "deadline": time.monotonic() + left}
        try:
            ticket = self.worker.submit(from_dict(Request, payload), sink)
        except Exception as exc:
            yield _error_event(exc)
            return
        try:
            while True:
                event = await sink.events.get()
                yield event
                if "chunk" not in event:
                    return
        finally:  # also on cancellation: the row leaves its batch (a no-op once answered)
            ticket.cancel()

    def info(self) -> dict[str, Any]:
        """This replica's actor, load and counters (tests and the fault benchmark)."""
        context = ray.get_runtime_context()
        return {
            "actor": context.current_actor,
            "actor_name": context.get_actor_name(),
            "pid": os.getpid(),
            "queued": self.worker.queued,
            "active_rows": self.worker.active_rows,
            "stats": to_dict(self.worker.stats),
        }

    def __del__(self) -> None:  # Serve calls this when it stops the replica
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.close(drain=False, timeout=5)


class _RemoteTicket(Ticket):
    def __init__(self, call: Future[None]) -> None:
        super().__init__()
        self._call = call

    def cancel(self) -> None:
        super().cancel()
        self._call.cancel()  # cancels the task on the worker's loop, which cancels the call


class RayWorker:
    """A `Worker` whose requests run on `replicas` Serve replicas of `GuardReplica`."""

    def __init__(
        self,
        replicas: int = 2,
        address: str | None = None,
        redis_url: str | None = None,
        model: str = EMBEDDED_DEFAULT,
        worker_options: dict[str, Any] | None = None,
        name: str = "guardrail",
        shared_key_file: str | None = None,
    ) -> None:
        """Start a local Ray instance, or connect to `address`, and deploy the app `name`.

        `worker_options` go to each replica's `LocalWorker`; a replica takes up to twice its
        `max_batch` requests at once, and up to `max_queue` more wait in Serve's router, where
        any replica can take them (beyond that: `OverloadedError`). `calibration` is loaded
        here first (calibrating if the store has none, so that the replicas find it), for the
        Guard's tenant settings. `shared_key_file` (default: `GUARDRAIL_SHARED_KEY_FILE` or
        `GUARDRAIL_SHARED_KEY`) signs what goes through Redis, here and in every replica (the
        path must exist on every node).
        """
        from guardrail.cache.signing import SHARED_KEY_FILE_ENV, read_key_file
        from guardrail.calibrate.store import default_store, load_or_calibrate
        from guardrail.runtime.model import load_model

        self.name = name
        lm = load_model(model)
        self.model_name = lm.name
        key = read_key_file(shared_key_file) if shared_key_file else None
        self.calibration: Calibration = load_or_calibrate(
            lm, store=default_store(redis_url, key), progress=False
        )
        # The cost model here checks each tenant's refusal text; calibrating it (once) here
        # also means the replicas find it in the store.
        scorers = load_scorers(lm, self.calibration, redis_url=redis_url, shared_key=key)
        self.scorers = Scorers(scorers.cost)
        del lm  # the replicas run the model; this process keeps calibration and cost model
        options = {
            **{k: p.default for k, p in inspect.signature(LocalWorker).parameters.items()},
            **(worker_options or {}),
        }
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(
                address=address,
                num_cpus=None if address else replicas,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        env = {k: os.environ[k] for k in _ENV_VARS if k in os.environ}
        env["HF_HUB_OFFLINE"] = "1"
        if redis_url:
            env["GUARDRAIL_REDIS_URL"] = redis_url
        if shared_key_file:
            env[SHARED_KEY_FILE_ENV] = str(Path(shared_key_file).resolve())
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING"})
        deployment = serve.deployment(
            name="GuardReplica",
            num_replicas=replicas,
            max_ongoing_requests=2 * options["max_batch"],
            max_queued_requests=options["max_queue"],
            ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env}},
        )(GuardReplica)
        app = deployment.bind(model, redis_url, worker_options or {})
        self._handle = serve.run(
            app, name=name, route_prefix=None, logging_config={"log_level": "WARNING"}
        )
        self._stream = self._handle.options(stream=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="guardrail-ray", daemon=True
        )
        self._thread.start()
        self._open: dict[asyncio.Task[None], bool] = {}  # in flight -> streaming yet?
        self._accepting = True
        self._aborting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queued(self) -> int:
        """Requests in flight with no event back yet (routing, replica queue, first chunk)."""
        return sum(not streaming for streaming in list(self._open.values()))

    @property
    def active_rows(self) -> int:
        """Requests in flight that have started streaming back."""
        return sum(list(self._open.values()))

    def replica_info(self) -> list[dict[str, Any]]:
        """`GuardReplica.info()` from every live replica."""
        return list(self._handle.broadcast("info").results(timeout_s=30))

    def submit(self, request: Request, sink: Sink) -> Ticket:
        if not self._accepting:
            raise ShutdownError("the guard worker is shutting down; request not accepted")
        payload = to_dict(request)
        if request.deadline is not None:
            payload["deadline"] = request.deadline - time.monotonic()
        return _RemoteTicket(
            asyncio.run_coroutine_threadsafe(self._call(payload, sink), self._loop)
        )

    async def _call(self, payload: dict[str, Any], sink: Sink) -> None:
        """Run one request on a replica and feed `sink` from its events."""
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = False
        response: DeploymentResponseGenerator[dict[str, Any]]
        response = self._stream.generate.remote(payload)  # type: ignore[assignment]
        try:
            async for event in response:
                self._open[task] = True
                if "chunk" in event:
                    sink.chunk(event["chunk"])
                    continue
                if "answer" in event:
                    sink.done(from_dict(Answer, event["answer"]))
                else:
                    sink.fail(_remote_error(event["error"]))
                return
            sink.fail(GuardrailError("the replica ended the stream without an answer"))
        except asyncio.CancelledError:
            response.cancel()  # type: ignore[no-untyped-call]
            shut = ShutdownError("the guard worker shut down before this finished")
            sink.fail(shut if self._aborting else CancelledError())
            raise
        except BackPressureError as exc:
            sink.fail(OverloadedError(f"the guard replicas are overloaded: {exc}"))
        except Exception as exc:  # a replica died, Serve is unavailable, ...
            lines = str(exc).strip().splitlines() or [""]
            sink.fail(GuardrailError(f"the Ray replica failed: {type(exc).__name__}: {lines[0]}"))
        finally:
            self._open.pop(task, None)

    async def _settle(self, timeout: float | None) -> int:
        """Wait up to `timeout` s for the requests in flight, fail the rest with
        `ShutdownError`; returns how many were cut off."""
        tasks = list(self._open)
        if tasks and timeout != 0:
            await asyncio.wait(tasks, timeout=timeout)
        late = [task for task in tasks if not task.done()]
        self._aborting = True
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        return len(late)

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests, finish (`drain`) or fail the open ones, then delete the app
        and stop the Ray instance this worker started."""
        if not self._thread.is_alive():
            return
        self._accepting = False
        settle = self._settle(timeout if drain else 0)
        late = asyncio.run_coroutine_threadsafe(settle, self._loop).result()
        try:
            serve.delete(self.name)
            if self._started_ray:
                serve.shutdown()  # type: ignore[no-untyped-call]
                ray.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        if drain and late:
            raise ShutdownError(f"{late} requests did not finish within {timeout} s")


__all__ = ["GuardReplica", "RayWorker", "from_dict", "to_dict"]
