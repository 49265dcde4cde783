"""`GET /metrics`: the server's counters in Prometheus text format, kept with `prometheus_client`.

Each app gets a registry of its own (several servers in one process, as in tests, never share
counts). What is counted, and where:

- `mlx_gemma_requests_total{endpoint, status}`: every answered request by HTTP status, recorded
  by an ASGI middleware from the response's start line (so 401s, 413s and 404s count too; a stream
  counts as its 200 when it starts);
- `mlx_gemma_prompt_tokens_total`, `mlx_gemma_prompt_cached_tokens_total` (the part of those the
  prefix cache supplied), `mlx_gemma_generation_tokens_total`, and the histograms
  `mlx_gemma_time_to_first_token_seconds` and `mlx_gemma_time_per_output_token_seconds` (one
  observation per request: (last token - first token) / (tokens - 1)), recorded when a request
  finishes;
- read from the engine at scrape time: `mlx_gemma_running_rows` / `mlx_gemma_waiting_rows`, and
  the prefix cache's `mlx_gemma_prompt_cache_bytes`, `..._entries`, `..._lookups_total`,
  `..._hits_total` and `..._hit_rate` (hits / lookups).
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds. First-token times span a cached short prompt (milliseconds) to a long cold prefill on
# a CPU (tens of seconds); per-token times a fast batch step to a 16-row step under load.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
# The endpoint label takes these values and "other" (a label per unknown path would let any
# client grow the registry without bound).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models")


class _EngineCollector:
    """Gauges and counters the engine thread keeps as plain numbers, read when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        running, waiting = self.engine.load()
        yield GaugeMetricFamily("mlx_gemma_running_rows", "Requests in the decode batch", value=running)
        yield GaugeMetricFamily("mlx_gemma_waiting_rows", "Requests queued or prefilling", value=waiting)
        store = getattr(self.engine, "prefix_cache", None)
        if store is None:
            return
        yield GaugeMetricFamily("mlx_gemma_prompt_cache_bytes", "Bytes of KV the prompt-prefix cache holds",
                                value=store.nbytes)
        yield GaugeMetricFamily("mlx_gemma_prompt_cache_entries", "Prefixes the prompt-prefix cache holds",
                                value=len(store))
        yield CounterMetricFamily("mlx_gemma_prompt_cache_lookups", "Prompts looked up in the prefix cache",
                                  value=store.lookups)
        yield CounterMetricFamily("mlx_gemma_prompt_cache_hits", "Lookups that reused a cached prefix",
                                  value=store.hits)
        yield GaugeMetricFamily("mlx_gemma_prompt_cache_hit_rate", "Hits / lookups since the server started",
                                value=store.hits / store.lookups if store.lookups else 0.0)


class ServerMetrics:
    """The registry of one app, and the calls that record into it."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mlx_gemma_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mlx_gemma_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("mlx_gemma_prompt_cached_tokens",
                                     "Prompt tokens the prefix cache supplied (not prefilled)", registry=r)
        self.generated_tokens = Counter("mlx_gemma_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("mlx_gemma_time_to_first_token_seconds", "From submission to the first new token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("mlx_gemma_time_per_output_token_seconds",
                              "Per request: time between the first and last token / (tokens - 1)",
                              buckets=TPOT_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def finished(self, n_prompt: int, n_cached: int, n_out: int, submitted: float, first: Optional[float],
                 end: float) -> None:
        """Record one finished request (times from time.perf_counter)."""
        self.prompt_tokens.inc(n_prompt)
        self.cached_tokens.inc(n_cached)
        self.generated_tokens.inc(n_out)
        if first is not None:
            self.ttft.observe(first - submitted)
            if n_out > 1 and end > first:
                self.tpot.observe((end - first) / (n_out - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusMiddleware:
    """ASGI middleware counting every /v1/ request by endpoint and the status it was answered with."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)

        async def counted(message):
            if message["type"] == "http.response.start":
                endpoint = path if path in ENDPOINTS else "other"
                self.metrics.requests.labels(endpoint=endpoint, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
