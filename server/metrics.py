"""Prometheus metrics, named after vLLM's with an `rheads:` prefix, plus the KV saving itself."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
STEP_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """One registry per server, so that several servers (tests) never share counters."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"rheads:{name}", doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"rheads:{name}", doc, labels, buckets=LATENCY_BUCKETS, registry=r).labels(model_name)

        self.running = gauge("num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting for cache memory or a batch slot.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of the KV cache (both pools) in use, 0-1.")
        self.kv_bytes = gauge("kv_cache_bytes_used", "Bytes of KV cache held by resident sequences.")
        self.kv_full = gauge("kv_cache_bytes_full_equivalent",
                             "Bytes a full (every head, every token; a sliding-window layer's window) cache "
                             "would hold for the same tokens.")
        self.kv_pages = gauge("kv_cache_pages_used", "Pages of the full-head pool in use.")
        self.kv_slots = gauge("kv_cache_window_slots_used", "Streaming-head window slots in use.")
        self.preemptions = gauge("num_preemptions", "Sequences preempted (and recomputed) so far.")
        self.prefix_bytes = gauge("prefix_cache_bytes_cached", "Bytes of KV cache held by cached prefixes no "
                                  "request uses (evictable pages and window snapshots).")
        self.prefix_queries = Counter("rheads:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache.", labels, registry=r).labels(model_name)
        self.prefix_hits = Counter("rheads:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   labels, registry=r).labels(model_name)
        self._prefix_seen = (0, 0)  # the engine's running totals as of the last observation
        self.prompt_tokens = Counter("rheads:prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("rheads:generation_tokens", "Tokens generated.", labels,
                                         registry=r).labels(model_name)
        self.requests = Counter("rheads:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=r)
        self.buffered = gauge("stream_outputs_buffered",
                              "Outputs that arrived for a request and wait for its client to take them (at most "
                              "one per request: later ones merge into it).")
        self.coalesced = Counter("rheads:stream_outputs_coalesced", "Outputs merged into one still waiting for "
                                 "a client that reads more slowly than the engine generates.", labels,
                                 registry=r).labels(model_name)
        self.model_name = model_name
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = histogram("e2e_request_latency_seconds", "Request latency from arrival to last token.")
        step_labels = labels + ["kind"]  # kind: "decode" (every sequence fed one token) or "mixed"
        self.step_seconds = Histogram("rheads:engine_step_seconds", "Duration of one engine step.", step_labels,
                                      buckets=STEP_BUCKETS, registry=r)
        self.step_seqs = Counter("rheads:engine_step_sequences", "Sequences scheduled, summed over steps.",
                                 step_labels, registry=r)
        self.step_kv_bytes = Counter("rheads:engine_step_kv_bytes", "KV bytes held after each step, summed over "
                                     "steps (for decode steps: the bytes their attention read).", step_labels,
                                     registry=r)
        self._last_step = None

    def observe_engine(self, engine) -> None:
        """Copy the engine's queue and cache state into the gauges (called from the engine thread)."""
        usage = engine.usage()
        self.running.set(engine.num_running)
        self.waiting.set(engine.num_waiting)
        self.kv_usage.set(usage.usage_fraction)
        self.kv_bytes.set(usage.bytes_used)
        self.kv_full.set(usage.bytes_full_equivalent)
        self.kv_pages.set(usage.pages_used)
        self.kv_slots.set(usage.slots_used)
        self.preemptions.set(engine.scheduler.num_preemptions)
        self.prefix_bytes.set(usage.bytes_cached)
        queries, hits = engine.prefix_cache_totals  # since start (a reset empties the cache, not the totals)
        self.prefix_queries.inc(queries - self._prefix_seen[0])
        self.prefix_hits.inc(hits - self._prefix_seen[1])
        self._prefix_seen = (queries, hits)
        step = engine.last_step
        if step is not None and step is not self._last_step:
            self._last_step = step
            kind = "decode" if step.decode_only else "mixed"
            self.step_seconds.labels(self.model_name, kind).observe(step.seconds)
            self.step_seqs.labels(self.model_name, kind).inc(step.num_seqs)
            self.step_kv_bytes.labels(self.model_name, kind).inc(step.kv_bytes)

    def finished(self, reason: str | None) -> None:
        self.requests.labels(self.model_name, reason or "unknown").inc()
