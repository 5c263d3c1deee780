"""Prometheus metrics of the server (`/metrics`), on a registry of its own so two apps can share a process.

Who records what:
* the access-log middleware of `app.py`: `observe_request(protocol, status)` once per HTTP request (499 for one
  whose client left before its response ended);
* `ServeContext.start` (the generation wrapper both protocols use): `observe_first_token`, `observe_token_gap`
  and `add_usage` as the stream runs;
* scrape time: queue depth and running requests from the limiter, KV-cache use and prefix-cache hit rate from
  the engine's stats (`set_sources`), so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .request import Usage

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    """The server's counters, histograms and gauges; every name starts with `dsv4_`."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dsv4_requests", "HTTP requests by protocol and status", ["protocol", "status"],
                                registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("dsv4_completion_tokens", "completion tokens", ["model"], registry=r)
        self.cached_tokens = Counter("dsv4_cached_prompt_tokens", "prompt tokens read from the prefix cache",
                                     ["model"], registry=r)
        self.reasoning_tokens = Counter("dsv4_reasoning_tokens", "completion tokens spent reasoning", ["model"],
                                        registry=r)
        self.cost = Counter("dsv4_cost_usd", "cost of the generated usage at the price table, USD", ["model"],
                            registry=r)
        self.ttft = Histogram("dsv4_time_to_first_token_seconds", "arrival to the first generated event",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv4_inter_token_latency_seconds", "gap between consecutive generated events",
                             buckets=_GAP_BUCKETS, registry=r)
        self.queue_depth = Gauge("dsv4_queue_depth", "requests waiting for a running slot", registry=r)
        self.running = Gauge("dsv4_running_requests", "requests holding a running slot", registry=r)
        self.kv_used = Gauge("dsv4_kv_cache_usage_ratio", "fraction of KV cache bytes in use", registry=r)
        self.kv_bytes = Gauge("dsv4_kv_cache_used_bytes", "KV cache bytes in use", registry=r)
        self.prefix_hit_rate = Gauge("dsv4_prefix_cache_hit_rate", "prefix-cache hits / lookups so far",
                                     registry=r)
        self.kv_total = Gauge("dsv4_kv_cache_bytes", "KV cache bytes allocated (slot states and pages), by the "
                              "rows' storage format", ["format"], registry=r)
        self.kv_page = Gauge("dsv4_kv_page_bytes", "bytes of one KV page over every layer, by format", ["format"],
                             registry=r)
        self.kv_pages = Gauge("dsv4_kv_pages", "KV pages in the pool, by state", ["state"], registry=r)
        self._engine_stats: Callable[[], Any] | None = None

    def set_sources(self, queue_depth: Callable[[], int], running: Callable[[], int],
                    engine_stats: Callable[[], Any] | None = None) -> None:
        """Read these at scrape time. `engine_stats` returns a `dsv4.engine.EngineStats` (or None)."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)
        self._engine_stats = engine_stats

    # ---------------------------------------------------------------- recording
    def observe_request(self, protocol: str, status: int) -> None:
        """One finished HTTP request (protocol "openai", "anthropic" or "other"), by its response status."""
        self.requests.labels(protocol, str(status)).inc()

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def add_usage(self, model: str, usage: Usage) -> None:
        """A request's usage (all its choices) and cost."""
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.completion_tokens.labels(model).inc(usage.completion_tokens)
        self.cached_tokens.labels(model).inc(usage.cached_tokens)
        self.reasoning_tokens.labels(model).inc(usage.reasoning_tokens)
        self.cost.labels(model).inc(usage.cost)

    def timer(self) -> TokenTimer:
        """A per-request clock started now: call `.tick()` at each generated event."""
        return TokenTimer(self)

    # ---------------------------------------------------------------- export
    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        stats = self._engine_stats() if self._engine_stats is not None else None
        if stats is not None:
            self.kv_bytes.set(stats.kv_bytes_used)
            self.kv_used.set(stats.kv_bytes_used / stats.kv_bytes if stats.kv_bytes else 0.0)
            self.prefix_hit_rate.set(stats.prefix_hits / stats.prefix_lookups if stats.prefix_lookups else 0.0)
            self.kv_total.labels(stats.kv_format).set(stats.kv_bytes)
            self.kv_page.labels(stats.kv_format).set(stats.page_bytes)
            self.kv_pages.labels("used").set(stats.pages_used)
            self.kv_pages.labels("free").set(stats.pages_total - stats.pages_used)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TokenTimer:
    """Time to first token (from the timer's creation, so queueing counts) and the gaps after it."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.start = self.last = time.monotonic()
        self.first: float | None = None

    def tick(self) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now - self.start
            self.metrics.observe_first_token(self.first)
        else:
            self.metrics.observe_token_gap(now - self.last)
        self.last = now
