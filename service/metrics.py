"""The one module that owns Prometheus objects (docs/architecture.md, "Metrics").

Everything else reports plain numbers through :class:`Metrics` methods, so the engine and the
backends never import prometheus_client. Each app gets its own registry, which keeps tests that
build several apps independent.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "longhaul_"
# Long-context requests run from milliseconds to minutes: buckets span 1 ms .. 10 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                         0.3, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
BATCH_TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def length_bucket(tokens: int) -> str:
    """Label for inference_duration_seconds: the power-of-two ceiling, e.g. "<=4096"."""
    bound = 128
    while bound < tokens:
        bound *= 2
    return f"<={bound}"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP requests by final status",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds", "End-to-end request time", ["model", "endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            PREFIX + "queue_duration_seconds", "Time from enqueue to batch start", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(PREFIX + "queue_depth", "Requests waiting", ["model"], registry=r)
        self.batch_size = Histogram(
            PREFIX + "batch_size",
            "Sequences per forward pass",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            PREFIX + "batch_tokens", "Padded tokens per forward pass (batch x length)", ["model"],
            buckets=BATCH_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_padding_ratio = Histogram(
            PREFIX + "batch_padding_ratio", "Share of padded positions in a batch", ["model"],
            buckets=RATIO_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_duration = Histogram(
            PREFIX + "inference_duration_seconds", "Backend forward time",
            ["model", "length_bucket"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.input_tokens = Counter(
            PREFIX + "input_tokens", "Prompt/input tokens", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            PREFIX + "generated_tokens", "Generated tokens", ["model"], registry=r
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds", "Arrival to first generated token", ["model"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens of a stream",
            ["model"], buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests_rejected = Counter(
            PREFIX + "requests_rejected",
            "Requests refused before inference",
            ["model", "reason"],
            registry=r,
        )
        self.model_failures = Counter(
            PREFIX + "model_failures",
            "Requests that failed inside the model (backend errors, not bad input)",
            ["model"],
            registry=r,
        )
        self.model_healthy = Gauge(
            PREFIX + "model_healthy",
            "1 while the model serves, 0 once its recent requests all failed",
            ["model"],
            registry=r,
        )
        self.model_info = Gauge(
            PREFIX + "model_info", "Loaded model versions (value 1)",
            ["model", "version", "architecture", "format", "precision", "provider"], registry=r,
        )  # fmt: skip
        self.running_sequences = Gauge(
            PREFIX + "running_sequences",
            "Generation requests admitted and not finished (prefilling or decoding)",
            ["model"],
            registry=r,
        )
        self.waiting_sequences = Gauge(
            PREFIX + "waiting_sequences",
            "Generation requests waiting for admission",
            ["model"],
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            PREFIX + "kv_cache_bytes",
            "KV cache bytes allocated (decode buffer and partial prefills)",
            ["model"],
            registry=r,
        )
        self.prefix_cache_lookups = Counter(
            PREFIX + "prefix_cache_lookups",
            "Generation prompts looked up in the prefix cache",
            ["model"],
            registry=r,
        )
        self.prefix_cache_lookup_tokens = Counter(
            PREFIX + "prefix_cache_lookup_tokens",
            "Prompt tokens of the prompts looked up in the prefix cache",
            ["model"],
            registry=r,
        )
        self.prefix_cache_hit_tokens = Counter(
            PREFIX + "prefix_cache_hit_tokens",
            "Prompt tokens whose KV entries came from the prefix cache instead of a prefill",
            ["model"],
            registry=r,
        )
        self.prefix_cache_evictions = Counter(
            PREFIX + "prefix_cache_evicted_blocks",
            "Prefix-cache blocks evicted (least recently used) to make room",
            ["model"],
            registry=r,
        )
        self.prefix_cache_bytes = Gauge(
            PREFIX + "prefix_cache_bytes",
            "Bytes of KV entries held by the prefix cache (beside kv_cache_bytes)",
            ["model"],
            registry=r,
        )
        self.prefix_cache_blocks = Gauge(
            PREFIX + "prefix_cache_blocks", "Blocks held by the prefix cache", ["model"],
            registry=r,
        )  # fmt: skip
        self.batch_time_coefficient = Gauge(
            PREFIX + "batch_time_coefficient",
            "Encode batch time model: seconds per unit of each term (fixed, per_sequence, "
            "per_token, per_attention); source measured or architecture",
            ["model", "term", "source"],
            registry=r,
        )
        self.calibration_duration = Gauge(
            PREFIX + "calibration_duration_seconds",
            "Warm-up time spent timing batch shapes",
            ["model"],
            registry=r,
        )

    # Plain-number reporting API used by the api and engine layers.

    def observe_request(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()
        self.request_duration.labels(model, endpoint).observe(seconds)

    def observe_batch(
        self,
        model: str,
        size: int,
        padded_tokens: int,
        real_tokens: int,
        queue_seconds: list[float],
    ) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_tokens.labels(model).observe(padded_tokens)
        ratio = 1.0 - real_tokens / padded_tokens if padded_tokens else 0.0
        self.batch_padding_ratio.labels(model).observe(ratio)
        for seconds in queue_seconds:
            self.queue_duration.labels(model).observe(seconds)

    def observe_queue(self, model: str, seconds: float) -> None:
        """One request's wait from arrival to admission (generation admits outside a batch)."""
        self.queue_duration.labels(model).observe(seconds)

    def observe_inference(self, model: str, length: int, seconds: float) -> None:
        self.inference_duration.labels(model, length_bucket(length)).observe(seconds)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def count_input_tokens(self, model: str, tokens: int) -> None:
        self.input_tokens.labels(model).inc(tokens)

    def count_generated_tokens(self, model: str, tokens: int) -> None:
        self.generated_tokens.labels(model).inc(tokens)

    def observe_first_token(self, model: str, seconds: float) -> None:
        self.time_to_first_token.labels(model).observe(seconds)

    def observe_inter_token(self, model: str, seconds: float) -> None:
        self.inter_token_latency.labels(model).observe(seconds)

    def reject(self, model: str, reason: str) -> None:
        self.requests_rejected.labels(model, reason).inc()

    def observe_model_outcome(self, model: str, ok: bool, healthy: bool) -> None:
        if not ok:
            self.model_failures.labels(model).inc()
        self.model_healthy.labels(model).set(1 if healthy else 0)

    def set_generation_state(
        self, model: str, running: int, waiting: int, kv_cache_bytes: int
    ) -> None:
        self.running_sequences.labels(model).set(running)
        self.waiting_sequences.labels(model).set(waiting)
        self.kv_cache_bytes.labels(model).set(kv_cache_bytes)

    def observe_prefix_lookup(self, model: str, prompt_tokens: int, hit_tokens: int) -> None:
        """``prompt_tokens`` > 0: a prompt's first lookup; ``hit_tokens`` reused by any lookup."""
        if prompt_tokens:
            self.prefix_cache_lookups.labels(model).inc()
            self.prefix_cache_lookup_tokens.labels(model).inc(prompt_tokens)
        if hit_tokens:
            self.prefix_cache_hit_tokens.labels(model).inc(hit_tokens)

    def set_prefix_cache(self, model: str, nbytes: int, blocks: int, evicted: int) -> None:
        """The cache's size now; ``evicted``: blocks evicted since the last report."""
        self.prefix_cache_bytes.labels(model).set(nbytes)
        self.prefix_cache_blocks.labels(model).set(blocks)
        if evicted:
            self.prefix_cache_evictions.labels(model).inc(evicted)

    def set_model_info(
        self, model: str, version: int, architecture: str, fmt: str, precision: str, provider: str
    ) -> None:
        # One series per model: drop the previous version's labels on reload (only these: the
        # batch time model of the same load may already be set).
        self._remove_model_info(model)
        self.model_info.labels(model, str(version), architecture, fmt, precision, provider).set(1)
        self.model_healthy.labels(model).set(1)  # a version is served once it answered warm-up

    def set_batch_time_model(
        self, model: str, source: str, coefficients: dict[str, float], seconds: float
    ) -> None:
        self._remove_labelled(self.batch_time_coefficient, model)
        for term, value in coefficients.items():
            self.batch_time_coefficient.labels(model, term, source).set(value)
        self.calibration_duration.labels(model).set(seconds)

    def remove_model(self, model: str) -> None:
        self._remove_model_info(model)
        self._remove_labelled(self.batch_time_coefficient, model)
        self._remove_labelled(self.calibration_duration, model)
        self._remove_labelled(self.model_healthy, model)
        self._remove_labelled(self.prefix_cache_bytes, model)
        self._remove_labelled(self.prefix_cache_blocks, model)

    @staticmethod
    def _remove_labelled(gauge: Gauge, model: str) -> None:
        for family in gauge.collect():
            for labels in {tuple(s.labels.values()) for s in family.samples}:
                if labels[0] == model:
                    gauge.remove(*labels)

    def _remove_model_info(self, model: str) -> None:
        for labels in list(self._model_info_labels()):
            if labels[0] == model:
                self.model_info.remove(*labels)

    def _model_info_labels(self) -> list[tuple[str, ...]]:
        return [tuple(s.labels.values()) for m in self.model_info.collect() for s in m.samples]

    def render(self) -> bytes:
        return generate_latest(self.registry)
