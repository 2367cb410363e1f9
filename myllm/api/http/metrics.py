"""Prometheus metrics (`GET /metrics`, admin keys only when keys are on), with
`prometheus-client`. Three sources: every HTTP request on both listeners (`MetricsMiddleware`),
the runtime's events (generations, loads, unloads: `Metrics` is the runtime's `RuntimeEvents`),
and, at each scrape, the loaded models and their runners' own figures (queue, memory, saved KV).
Requests are counted from the access log's fields (`request_done`), so both always agree."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from myllm.api.http.auth import require_admin
from myllm.api.state import services
from myllm.runtime.engine_types import DoneEvent
from myllm.runtime.hooks import RuntimeEvents
from myllm.runtime.placement.report import per_model

router = APIRouter(tags=["Operations"])
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class _Snapshot(Collector):
    """Gauges read at scrape time: what is loaded now, filled in by `Metrics.render`."""

    def __init__(self) -> None:
        self.families: list[Any] = []

    def collect(self) -> Iterator[Any]:
        yield from self.families


class Metrics(RuntimeEvents):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("myllm_requests_total", "HTTP requests answered", ["api", "route", "status"], registry=r)
        self.duration = Histogram("myllm_request_duration_seconds", "HTTP request time, to the last byte",
                                  ["api", "route"], buckets=LATENCY, registry=r)
        self.tokens = Counter("myllm_tokens_total", "Tokens: prompt (evaluated), cached (reused from KV), completion, "
                              "drafted and draft_accepted (speculative decoding)", ["model", "kind"], registry=r)
        self.ttft = Histogram("myllm_time_to_first_token_seconds", "Prompt evaluation to the first token, in the runner",
                              ["model"], buckets=LATENCY, registry=r)
        self.tpot = Histogram("myllm_time_per_output_token_seconds", "Generation time per output token, in the runner",
                              ["model"], buckets=PER_TOKEN, registry=r)
        self.loads = Counter("myllm_model_loads_total", "Model loads (runner starts)", ["model"], registry=r)
        self.load_seconds = Histogram("myllm_model_load_seconds", "Time to start a runner and load its model",
                                      ["model"], buckets=LATENCY, registry=r)
        self.evictions = Counter("myllm_model_evictions_total", "Models unloaded, by why", ["model", "reason"], registry=r)
        self.snapshot = _Snapshot()
        r.register(self.snapshot)

    # -- the runtime's events --------------------------------------------------------------

    def generation_done(self, model: str, done: DoneEvent) -> None:
        self.tokens.labels(model, "prompt").inc(done.prompt_eval_tokens)
        self.tokens.labels(model, "cached").inc(done.prompt_tokens - done.prompt_eval_tokens)
        self.tokens.labels(model, "completion").inc(done.completion_tokens)
        if done.draft_tokens:
            self.tokens.labels(model, "drafted").inc(done.draft_tokens)
            self.tokens.labels(model, "draft_accepted").inc(done.draft_accepted)
        if done.completion_tokens:
            self.ttft.labels(model).observe(done.prompt_ms / 1000)
            self.tpot.labels(model).observe(done.generation_ms / 1000 / done.completion_tokens)

    def model_loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model).inc()
        self.load_seconds.labels(model).observe(seconds)

    def model_unloaded(self, model: str, reason: str) -> None:
        self.evictions.labels(model, reason).inc()

    def request_done(self, fields: dict[str, Any]) -> None:
        """One answered request, as its log line describes it (`AccessLogMiddleware`'s fields)."""
        self.requests.labels(fields["api"], fields["route"], str(fields["status"])).inc()
        self.duration.labels(fields["api"], fields["route"]).observe(fields["ms"] / 1000)

    # -- a scrape --------------------------------------------------------------------------

    async def render(self, request: Request) -> bytes:
        """The text format, with the loaded models' figures as of now (each runner asked at once)."""
        runtime = services(request).runtime
        loaded = runtime.loaded()
        models = per_model(loaded)  # one sample per model label, however many instances it has
        stats = await asyncio.gather(*(runtime.runner_stats(m.name) for m in models), return_exceptions=True)
        queue = GaugeMetricFamily("myllm_queue_depth", "Requests waiting for a slot", labels=["model"])
        active = GaugeMetricFamily("myllm_active_requests", "Requests holding the model", labels=["model"])
        memory = GaugeMetricFamily("myllm_model_memory_bytes", "A loaded model's runners (one per instance), resident memory measured",
                                   labels=["model"])
        kv_bytes = GaugeMetricFamily("myllm_kv_cache_bytes", "Saved conversation KV held in RAM", labels=["model"])
        kv_hits = CounterMetricFamily("myllm_kv_cache_hits", "Turns that reused a saved conversation KV", labels=["model"])
        for info, figures in zip(models, stats):
            queue.add_metric([info.name], info.queued)
            active.add_metric([info.name], info.active)
            memory.add_metric([info.name], info.rss)
            if isinstance(figures, dict):
                kv_bytes.add_metric([info.name], figures.get("kv_bytes", 0))
                kv_hits.add_metric([info.name], figures.get("kv_hits", 0))
        count = GaugeMetricFamily("myllm_loaded_models", "Model instances loaded", value=len(loaded))
        budget = GaugeMetricFamily("myllm_memory_budget_bytes", "MYLLM_MAX_MEMORY", value=runtime.memory_budget())
        self.snapshot.families = [queue, active, memory, kv_bytes, kv_hits, count, budget]
        return generate_latest(self.registry)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    require_admin(request, "reading metrics")
    body = await request.app.state.metrics.render(request)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
