"""The serving peer: what a PyTorch user writes without Longhaul. FastAPI + eager fp32 PyTorch,
one request = one forward pass, no batching across requests, no queue.

Same checkpoint, tokenizer, wire format (the subset of ``POST /v1/encode`` the load test uses)
and output (mean pooling over real tokens, L2-normalised) as Longhaul, so the load generator
and the answers are interchangeable. The route is a plain ``def``: FastAPI runs it in its
thread pool, which is what the tutorials do; concurrent requests therefore run concurrent
forward passes that share the cores.

    python -m benchmarks.naive_server --checkpoint DIR --port P
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from exporters.checkpoint import load_checkpoint


class EncodeBody(BaseModel):
    model: str
    inputs: str | list[str]
    pooling: str = "mean"
    normalize: bool = True


def create_app(checkpoint: Path) -> FastAPI:
    ckpt = load_checkpoint(checkpoint)
    model, tokenizer = ckpt.model.eval(), ckpt.tokenizer
    max_len = ckpt.config.max_positions
    app = FastAPI(title="naive eager PyTorch server")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/encode")
    def encode(body: EncodeBody) -> dict[str, object]:
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        rows = [enc.ids for enc in tokenizer.encode_batch(texts)]
        if max_len is not None and max(len(r) for r in rows) > max_len:
            raise HTTPException(400, "input too long")
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with torch.inference_mode():
            _, hidden = model(ids, mask)  # (b, t, d)
        m = mask[..., None].float()
        pooled = ((hidden * m).sum(1) / m.sum(1)).numpy()  # (b, d)
        if body.normalize:
            pooled = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
        return {
            "model": body.model,
            "embeddings": pooled.tolist(),
            "usage": {"prompt_tokens": int(mask.sum())},
        }

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
