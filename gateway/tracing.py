"""OpenTelemetry tracing, only when configured (`gateway.observability.otlp_endpoint`).

One span per RPC (`clipsearch.rpc`), with the method, status and request id as attributes.
The OTLP exporter is an optional dependency (`pip install clipsearch[tracing]`); without an
endpoint nothing is imported and no span is made.
"""

from __future__ import annotations

from typing import Any


def tracer_for(endpoint: str, exporter: Any = None) -> Any:
    """A tracer exporting to `endpoint` (or to `exporter`, for tests), or None when off."""
    if not endpoint and exporter is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise RuntimeError(
            "tracing is configured but opentelemetry-sdk is not installed; "
            "pip install 'clipsearch[tracing]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": "clipsearch-gateway"}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise RuntimeError(
                "gateway.observability.otlp_endpoint is set but the OTLP exporter is not "
                "installed; pip install 'clipsearch[tracing]'"
            ) from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider.get_tracer("clipsearch.gateway")
