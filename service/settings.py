"""Service settings, read from ``LONGHAUL_*`` environment variables once, in ``create_app``.

Never read at import time: tests and embedders build ``Settings(...)`` explicitly.
"""

from __future__ import annotations

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

    # Encode batching (DESIGN.md, "Batching").
    batch_cost_budget: float = Field(
        default=4.0e6,
        gt=0,
        description="max attention cost of one encode batch (architecture cost units)",
    )
    max_batch_size: int = Field(default=32, ge=1, description="max sequences in one encode batch")
    max_wait_ms: float = Field(
        default=5.0, ge=0, description="a batch closes when its oldest request waited this long"
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

    # Runtime.
    intra_op_threads: int = Field(
        default=0, ge=0, description="ORT/torch intra-op threads; 0 = runtime default"
    )
    providers: list[str] = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        description="ONNX Runtime providers in order of preference",
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
    request_timeout_seconds: float = Field(
        default=600.0,
        ge=0,
        description="deadline of an encode or generate request, from arrival; past it the "
        "request is cancelled wherever it is and answered 504. 0 = none. A request may ask for "
        "less with the X-Request-Timeout header (seconds), never for more",
    )
