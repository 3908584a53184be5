"""Prometheus metrics of one serving app, on the app's own CollectorRegistry (so a process, a test
suite for instance, can hold several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cdd_http_requests", "HTTP requests answered, by route and status code", ["route", "code"], registry=r
        )
        self.request_latency = Histogram(
            "cdd_request_latency_seconds", "task request latency, arrival to response", ["task"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "cdd_queue_wait_seconds", "time a task request waited in the queue before its batch ran", ["task"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "cdd_batch_size", "requests per executed batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "cdd_batch_rows", "rows (images or tiles) per executed batch, before padding", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "cdd_batch_execute_seconds", "device time of one batch: text, sampling, decoding", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("cdd_queue_depth", "requests waiting in the queue", registry=r)
        self.adapter_swaps = Counter(
            "cdd_adapter_swaps", "adapter weights copied into a live slot (hot swaps)", registry=r
        )
        self.adapter_load_seconds = Histogram(
            "cdd_adapter_load_seconds", "time to verify and load an adapter onto the device", buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.adapter_evictions = Counter(
            "cdd_adapter_evictions", "resident adapters dropped to stay within the memory budget", registry=r
        )
        self.resident_adapters = Gauge("cdd_resident_adapters", "adapters resident on the device", registry=r)
        self.resident_bytes = Gauge("cdd_resident_adapter_bytes", "bytes of resident adapter weights", registry=r)
        self.graph_captures = Counter("cdd_cuda_graph_captures", "CUDA graphs captured", registry=r)
        self.graph_replays = Counter("cdd_cuda_graph_replays", "CUDA graph replays", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
