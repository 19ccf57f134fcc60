"""Prometheus metrics for the server: what the guard decides, how fast, how full the worker is.

One registry per app (not the process-global one), so several servers or tests in one
process never clash. Requests are counted by tenant, path and whether the gate fired, which
gives the fire rate, the refusal rate and the search rate per tenant; answers' costs and
search candidates are histograms; the cost-score cache's hits and misses are read from the
worker. With `tracing`, each answered request is also an OpenTelemetry span.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from guardrail.decision import Decision
from guardrail.serve.tracing import Tracing


class Metrics:
    def __init__(self, worker: Any = None, tracing: Tracing | None = None) -> None:
        self.tracing = tracing
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "guardrail_requests",
            "Answered requests by tenant, guard path and whether the gate fired",
            ["tenant", "path", "fired"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "guardrail_request_seconds",
            "Time from arrival to the last byte of the answer",
            ["tenant"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.cost = Histogram(
            "guardrail_answer_cost",
            "Cost of returned answers under the cost model, by tenant",
            ["tenant"],
            buckets=(0.5, 1, 2, 3, 4, 5, 6, 8, 10),
            registry=self.registry,
        )
        self.candidates = Histogram(
            "guardrail_search_candidates",
            "Candidates scored per searched request",
            buckets=(4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.errors = Counter(
            "guardrail_errors",
            "Requests answered with an error, by HTTP status",
            ["status"],
            registry=self.registry,
        )
        if worker is not None and hasattr(worker, "stats"):
            queue = Gauge(
                "guardrail_queue_depth", "Requests waiting for the worker", registry=self.registry
            )
            queue.set_function(lambda: worker.queued)
            rows = Gauge(
                "guardrail_batch_rows", "Rows in the decoding batch now", registry=self.registry
            )
            rows.set_function(lambda: worker.active_rows)
            peak = Gauge(
                "guardrail_batch_rows_max", "Largest decoding batch so far", registry=self.registry
            )
            peak.set_function(lambda: worker.stats.max_rows)
            steps = Gauge(
                "guardrail_decode_steps", "Decode steps run so far", registry=self.registry
            )
            steps.set_function(lambda: worker.stats.steps)
        cache = getattr(getattr(getattr(worker, "scorers", None), "cost", None), "cache", None)
        if cache is not None and hasattr(cache, "hits"):
            for kind in ("hits", "misses"):
                gauge = Gauge(
                    f"guardrail_cost_cache_{kind}",
                    f"Cost-score cache {kind} so far",
                    registry=self.registry,
                )
                gauge.set_function(partial(getattr, cache, kind))

    def answered(self, decision: Decision, seconds: float) -> None:
        tenant = decision.tenant or "default"
        self.requests.labels(tenant, decision.path, str(decision.fired).lower()).inc()
        self.latency.labels(tenant).observe(seconds)
        if decision.cost is not None:
            self.cost.labels(tenant).observe(decision.cost)
        if decision.path == "search":
            self.candidates.observe(decision.candidates)
        if self.tracing is not None:
            self.tracing.answered(decision, seconds)

    def failed(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
