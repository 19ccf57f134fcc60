"""OpenTelemetry spans for answered requests, off unless turned on.

One span per request (`guardrail.request`), started at arrival and ended at the last byte,
with the decision as attributes (tenant, path, fired, gate score, cost, budget, search
candidates and rounds, tokens) and the worker's stage timings as events. It is written from
the same place the Prometheus metrics are, so the two always agree. Spans go to the tracer
provider given, or the process's global one (where the user's exporter is configured).
"""

from __future__ import annotations

import time
from typing import Any

from guardrail.decision import Decision


class Tracing:
    def __init__(self, provider: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "OpenTelemetry spans need opentelemetry-api and opentelemetry-sdk: "
                "pip install 'guardrail[otel]'"
            ) from exc
        self.tracer = (provider or trace.get_tracer_provider()).get_tracer("guardrail")

    def answered(self, decision: Decision, seconds: float) -> None:
        """A span that started `seconds` ago and ends now."""
        ended = time.time_ns()
        span = self.tracer.start_span("guardrail.request", start_time=ended - int(seconds * 1e9))
        attributes: dict[str, Any] = {
            "guardrail.tenant": decision.tenant or "default",
            "guardrail.path": decision.path,
            "guardrail.fired": decision.fired,
            "guardrail.guarded": decision.guarded,
            "guardrail.prompt_tokens": decision.prompt_tokens,
            "guardrail.new_tokens": decision.new_tokens,
            "guardrail.candidates": decision.candidates,
            "guardrail.rounds": decision.rounds,
        }
        for name in ("gate_score", "threshold", "cost", "budget", "reason"):
            if (value := getattr(decision, name)) is not None:
                attributes[f"guardrail.{name}"] = value
        span.set_attributes(attributes)
        for stage, ms in decision.timings_ms.items():
            span.add_event(f"guardrail.{stage}", {"ms": float(ms)})
        span.end(end_time=ended)


def console_provider() -> Any:
    """An SDK provider for `guardrail serve --otel`: OTLP when its exporter is installed and
    OTEL_EXPORTER_OTLP_ENDPOINT is set, else spans printed to stderr."""
    import os
    import sys

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider()
    exporter: Any
    try:
        if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            raise ImportError
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    except ImportError:
        exporter = ConsoleSpanExporter(out=sys.stderr)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


__all__ = ["Tracing", "console_provider"]
