"""Service settings, read from ``LONGHAUL_*`` environment variables once, in ``create_app``.

Never read at import time: tests and embedders build ``Settings(...)`` explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LONGHAUL_", extra="forbid")

    # Where models come from.
    store: Path = Field(default=Path("models"), description="model store root")
    models: list[str] = Field(
        default_factory=list,
        description="models to load at start: 'name' (newest) or 'name:version'; empty = all",
    )

    # HTTP.
    log_level: str = Field(default="info", description="service and uvicorn log level")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="larger bodies get 413"
    )
    api_keys: list[str] = Field(
        default_factory=list, description="bearer keys for /v1; empty = open"
    )
    admin_keys: list[str] = Field(
        default_factory=list,
        description="bearer keys for load/unload; empty = admin routes disabled",
    )

    # Encode batching (docs/architecture.md, "Batching"; service/engine/batcher.py).
    batch_policy: Literal["throughput", "deadline"] = Field(
        default="throughput",
        description="throughput: the worker takes what is queued the moment it is free, the "
        "batch that maximises predicted real tokens/s (cost model calibrated at warm-up); "
        "deadline: the earlier rule, a batch grows to the cost budget or waits max_wait_ms",
    )
    batch_cost_budget: float = Field(
        default=4.0e6,
        gt=0,
        description="max attention cost of one encode batch (architecture cost units)",
    )
    max_batch_size: int = Field(default=32, ge=1, description="max sequences in one encode batch")
    max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="throughput: the longest the cost model may hold a batch for a predicted "
        "arrival; deadline: a batch closes when its oldest request waited this long",
    )
    calibration_seconds: float = Field(
        default=3.0,
        ge=0,
        description="warm-up time per encode model for timing batch shapes (the batch time "
        "model); 0 = no timing, batches are scored by the architecture cost function alone",
    )
    max_queue_requests: int = Field(
        default=256, ge=1, description="per-model queue limit; beyond it 429"
    )
    retry_after_seconds: int = Field(default=1, ge=1, description="Retry-After sent with 429")

    # Generation (continuous batching).
    max_num_seqs: int = Field(
        default=16, ge=1, description="max sequences decoding together per model"
    )
    max_new_tokens_limit: int = Field(
        default=4096, ge=1, description="largest max_new_tokens a request may ask for"
    )
    kv_cache_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="KV cache budget per model, bytes"
    )
    prefill_chunk_tokens: int = Field(
        default=512, ge=16, description="prefill at most this many prompt tokens per step"
    )
    # 512 x 1024: a 512-token chunk on a 512-token past; at 16K cached tokens chunks shrink to
    # ~32 tokens, so a step's prefill stays about as long as the first chunk's.
    prefill_chunk_pairs: int = Field(
        default=512 * 1024,
        ge=256,
        description="full-attention decoders: a prefill chunk of n tokens on a past of P "
        "attends n*(P+n) pairs; chunks shrink to stay within this per step",
    )
    max_waiting_sequences: int = Field(
        default=256, ge=1, description="generation queue limit; beyond it 429"
    )
    # Automatic prefix caching (service/engine/prefix_cache.py; README, "Prefix caching").
    prefix_cache: bool = Field(
        default=True,
        description="kv_cache decoders: keep completed prompts' KV entries in token blocks and "
        "reuse the longest cached prefix of a new prompt instead of prefilling it again",
    )
    prefix_cache_bytes: int = Field(
        default=1024**3,
        ge=0,
        description="prefix cache bound per model, bytes, beside kv_cache_bytes (entries are "
        "copied into each sequence's own cache); least recently used blocks are evicted",
    )
    prefix_cache_block_tokens: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="tokens per prefix-cache block: the unit of storage and eviction (a match "
        "may end inside a block)",
    )

    # Runtime.
    thread_budget: int = Field(
        default=0,
        ge=0,
        description="intra-op threads shared by all loaded models: each gets budget // models "
        "(at least 1); 0 = the CPU cores this process may run on",
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        description="ORT/torch intra-op threads per model, overriding thread_budget; 0 = use "
        "the budget",
    )
    intra_op_spinning: bool = Field(
        default=True,
        description="ONNX Runtime: idle intra-op threads busy-wait for the next run (ORT's "
        "default); false lets them sleep, leaving the cores to the engine's Python work",
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime providers in order of preference",
    )
    torchscript_device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="TorchScript models: auto = cuda when torch sees a GPU"
    )
    gpu_tf32: bool = Field(
        default=False,
        description="let fp32 models multiply in TF32 on the GPU (ORT CUDA EP); off, they compute "
        "in fp32 as their parity was measured",
    )
    warmup: bool = Field(
        default=True, description="run a warm-up request per model before reporting ready"
    )
    drain_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="on reload/unload, how long the old version may finish requests in flight",
    )

    # Reliability: request identity, logs (service/api/logs.py).
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text: 'time level logger: message' lines; json: one JSON object per line "
        "(request id, route, model, status, tokens, queue and total time on access lines)",
    )

    def threads_per_model(self, models: int) -> int:
        """Intra-op threads for one of ``models`` models loaded at once (see thread_budget)."""
        if self.intra_op_threads:
            return self.intra_op_threads
        budget = self.thread_budget or len(os.sched_getaffinity(0))
        return max(1, budget // max(1, models))
