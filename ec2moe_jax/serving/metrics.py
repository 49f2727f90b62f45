"""The server's Prometheus metrics (prometheus-client, in a registry of its own) and its
count of XLA compilations (``jax.monitoring``), which the Stats RPC reports too.

Exported names (prefix ``ec2moe_``): ``queue`` (requests waiting for a batch), ``sessions``
(slots held), ``slots``, ``step_seconds`` and ``prefill_seconds`` (histograms of measured
compute per batched step / prefill), ``batch_rows`` (sessions per batched step),
``refused_total`` (RESOURCE_EXHAUSTED), ``expired_total`` (sessions freed by their TTL),
``rejected_payloads_total`` (wire payloads refused), ``errors_total{code}``,
``compilations_total``.
"""

from __future__ import annotations

import jax
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_STEP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class Metrics:
    """The metrics of one server (``slots``: its KV slot count)."""

    def __init__(self, slots: int):
        self.registry = r = CollectorRegistry()
        self.queue = Gauge("ec2moe_queue", "requests waiting for a batch", registry=r)
        self.sessions = Gauge("ec2moe_sessions", "sessions holding a KV slot", registry=r)
        Gauge("ec2moe_slots", "KV slots", registry=r).set(slots)
        self.step = Histogram("ec2moe_step_seconds", "measured seconds per batched decode step",
                              buckets=_STEP_BUCKETS, registry=r)
        self.prefill = Histogram("ec2moe_prefill_seconds", "measured seconds per prefill",
                                 buckets=_STEP_BUCKETS, registry=r)
        self.batch_rows = Histogram("ec2moe_batch_rows", "sessions per batched decode step",
                                    buckets=tuple(2.0**i for i in range(9)), registry=r)
        self.refused = Counter("ec2moe_refused", "sessions refused: every slot taken",
                               registry=r)
        self.expired = Counter("ec2moe_expired", "sessions freed after their TTL", registry=r)
        self.rejected = Counter("ec2moe_rejected_payloads", "wire payloads refused",
                                registry=r)
        self.errors = Counter("ec2moe_errors", "calls ended with an error status", ["code"],
                              registry=r)
        self._compiles = Counter("ec2moe_compilations", "XLA compilations in this process",
                                 registry=r)
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kw) -> None:
        if "backend_compile" in event:
            self.compiles += 1
            self._compiles.inc()

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP exporter on ``host:port`` (0: a free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
