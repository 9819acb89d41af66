"""Section 4 — generation: Longhaul's ``/v1/generate`` (streaming) against HF ``transformers``
``generate()`` on the same BLOOM weights.

A randomly initialised ``BloomForCausalLM`` (models.REALISTIC width/depth/heads) is saved with
``save_pretrained`` beside a Longhaul BPE ``tokenizer.json``, imported with
``python -m exporters import hf-bloom`` (the ALiBi decoder), exported with the CPU default path
chosen in section 2, and served by ``python -m service``. The peer loads the very same HF
directory with ``from_pretrained`` and calls ``generate()``.

Measured with greedy decoding (temperature 0, so both sides compute the same tokens) at 1 stream
(requests one after another) and at 16 streams (16 requests at once; HF: one batch of 16, left
padded, which is how ``generate()`` serves concurrent prompts):

* tokens/s = generated tokens of all streams / wall time of the level;
* TTFT = request sent → first token event; ITL = gaps between a stream's token events
  (Longhaul: client side over SSE, plus the server's own histograms from /metrics; HF: a
  ``BaseStreamer`` that timestamps every step).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import ROOT, free_port, median, percentile, server_process
from benchmarks.loadgen import require_loopback, wait_ready
from benchmarks.models import REALISTIC

DEFAULT_PATH = ("onnx", "fp32")


@dataclass(frozen=True)
class GenerationPlan:
    prompt_tokens: int
    max_new_tokens: int
    single_requests: int  # requests at 1 stream, one after another
    streams: tuple[int, ...]
    trained_context: int  # told to the importer; bounds the exporter's extrapolation sweep
    hf_dtypes: tuple[str, ...]


def plan(quick: bool) -> GenerationPlan:
    if quick:
        return GenerationPlan(
            prompt_tokens=32,
            max_new_tokens=16,
            single_requests=2,
            streams=(1, 16),
            trained_context=128,
            hf_dtypes=("float32",),
        )
    return GenerationPlan(
        prompt_tokens=128,
        max_new_tokens=128,
        single_requests=4,
        streams=(1, 16),
        trained_context=256,
        hf_dtypes=("float32", "bfloat16"),
    )


def available() -> str | None:
    """None when this section can run, else why not (reported in the results)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed"
    try:
        from exporters.importers import IMPORTERS
    except ImportError:
        return "exporters.importers (python -m exporters import hf-bloom) does not exist yet"
    if "hf-bloom" not in IMPORTERS:
        return "the hf-bloom importer is not registered in exporters.importers"
    return None


# ----------------------------------------------------------------------------- model


def make_bloom(workdir: Path, trained_context: int) -> tuple[Path, Path]:
    """HF BLOOM directory (random weights + Longhaul tokenizer) and its imported checkpoint."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    from benchmarks.serving import make_tokenizer

    src, ckpt = workdir / "hf-bloom", workdir / "bloom-checkpoint"
    if not (src / "config.json").is_file():
        tokenizer = make_tokenizer(REALISTIC.vocab_size)  # decoders: no <cls> post-processor
        config = BloomConfig(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=REALISTIC.d_model,
            n_layer=REALISTIC.n_layers,
            n_head=REALISTIC.n_heads,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,  # Longhaul's <eos>=1, <pad>=0
        )
        torch.manual_seed(0)
        BloomForCausalLM(config).save_pretrained(src, safe_serialization=True)
        tokenizer.save(str(src / "tokenizer.json"))
    if not (ckpt / "config.json").is_file():
        cmd = [
            sys.executable,
            "-m",
            "exporters",
            "import",
            "hf-bloom",
            str(src),
            "--out",
            str(ckpt),
            "--trained-context",
            str(trained_context),
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"python -m exporters import hf-bloom failed: {tail}")
    return src, ckpt


def prompts(tokenizer_path: Path, n: int, tokens: int) -> list[str]:
    """Held-out stdlib snippets of about ``tokens`` tokens each."""
    from tokenizers import Tokenizer

    from exporters.corpus import read_texts, split_corpus

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    split = split_corpus()
    text = "".join(read_texts(split.root, split.held_out, 400_000))
    ids = tokenizer.encode(text).ids
    rng = random.Random(0)
    starts = [rng.randrange(0, len(ids) - tokens) for _ in range(n)]
    return [tokenizer.decode(ids[s : s + tokens]) for s in starts]


# ----------------------------------------------------------------------------- Longhaul client


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    sent = time.perf_counter()
    events: list[float] = []
    usage: dict[str, Any] = {}
    text = []
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("text"):
                events.append(time.perf_counter())
                text.append(data["text"])
            usage = data.get("usage") or usage
    done = time.perf_counter()
    return {
        "sent": sent,
        "events": events,
        "done": done,
        "text": "".join(text),
        "completion_tokens": int(usage.get("completion_tokens", len(events))),
    }


def _summarise(rows: list[dict[str, Any]], wall: float, streams: int) -> dict[str, Any]:
    ttft = [r["events"][0] - r["sent"] for r in rows if r["events"]]
    gaps = [b - a for r in rows for a, b in zip(r["events"], r["events"][1:], strict=False)]
    tokens = sum(r["completion_tokens"] for r in rows)
    # Per-token ITL: a stream's decode time over its tokens after the first (events can carry
    # more than one token when text is held back, e.g. an incomplete UTF-8 character).
    itl_tokens = [
        (r["events"][-1] - r["events"][0]) / (r["completion_tokens"] - 1)
        for r in rows
        if len(r["events"]) > 1 and r["completion_tokens"] > 1
    ]
    return {
        "streams": streams,
        "requests": len(rows),
        "generated_tokens": tokens,
        "wall_s": round(wall, 4),
        "tokens_per_s": tokens / wall if wall else 0.0,
        "ttft_p50_s": median(ttft),
        "ttft_max_s": max(ttft) if ttft else float("nan"),
        "itl_p50_s": median(itl_tokens),
        "event_gap_p50_s": median(gaps),
        "event_gap_p99_s": percentile(gaps, 99),
        "ttft_s": [round(v, 5) for v in ttft],
        "itl_per_stream_s": [round(v, 6) for v in itl_tokens],
    }


async def _longhaul_level(
    base_url: str, model: str, texts: list[str], streams: int, p: GenerationPlan
) -> tuple[dict[str, Any], list[str]]:
    url = f"{base_url}/v1/generate"
    require_loopback(url)
    body = {"model": model, "max_new_tokens": p.max_new_tokens, "temperature": 0.0}
    async with httpx.AsyncClient(timeout=600) as client:
        started = time.perf_counter()
        if streams == 1:
            rows = [await _stream_one(client, url, {**body, "prompt": t}) for t in texts]
        else:
            rows = list(
                await asyncio.gather(
                    *(_stream_one(client, url, {**body, "prompt": t}) for t in texts[:streams])
                )
            )
        wall = time.perf_counter() - started
    return _summarise(rows, wall, streams), [r["text"] for r in rows]


def _server_token_histograms(base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (
            "longhaul_time_to_first_token_seconds",
            "longhaul_inter_token_latency_seconds",
        ):
            for s in family.samples:
                if s.name.endswith(("_sum", "_count")):
                    out[s.name] = out.get(s.name, 0.0) + s.value
    return out


# ----------------------------------------------------------------------------- HF peer


class HFPeer:
    """``transformers`` ``generate()`` on the HF directory, timed per step by a streamer."""

    EOS, PAD = 1, 0  # as configured in make_bloom

    def __init__(self, src: Path, dtype: str) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import BloomForCausalLM

        self.model = BloomForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
        self.tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))

    def generate(
        self, batch: list[str], max_new_tokens: int
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """One ``generate()`` call on a left-padded batch -> per-row timing rows and texts."""
        import torch
        from transformers.generation.streamers import BaseStreamer

        class StepClock(BaseStreamer):
            """put() is called once with the prompt, then once per generated step."""

            def __init__(self) -> None:
                self.times: list[float] = []

            def put(self, value: torch.Tensor) -> None:
                self.times.append(time.perf_counter())

            def end(self) -> None:
                pass

        encoded = [self.tokenizer.encode(t).ids for t in batch]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(batch), width), self.PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(encoded):  # left padding: the newest token is last in every row
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        clock = StepClock()
        sent = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                streamer=clock,
                eos_token_id=self.EOS,
                pad_token_id=self.PAD,
            )
        done = time.perf_counter()
        rows, texts = [], []
        for r in range(len(batch)):
            new = out[r, width:].tolist()
            n = new.index(self.EOS) + 1 if self.EOS in new else len(new)  # finished rows pad
            steps = clock.times[1 : 1 + n]  # every row gets its token at the same step
            rows.append({"sent": sent, "events": steps, "done": done, "completion_tokens": n})
            texts.append(self.tokenizer.decode([t for t in new[:n] if t != self.EOS]))
        return rows, texts

    def level(
        self, texts: list[str], streams: int, p: GenerationPlan
    ) -> tuple[dict[str, Any], list[str]]:
        started = time.perf_counter()
        rows: list[dict[str, Any]] = []
        out: list[str] = []
        if streams == 1:
            for t in texts:
                got, got_texts = self.generate([t], p.max_new_tokens)
                rows += got
                out += got_texts
        else:
            rows, out = self.generate(texts[:streams], p.max_new_tokens)
        return _summarise(rows, time.perf_counter() - started, streams), out


# ----------------------------------------------------------------------------- run


def _log_level(log: Callable[[str], None], label: str, streams: int, row: dict[str, Any]) -> None:
    log(
        f"  {label:<34}{streams:>3} streams {row['tokens_per_s']:8.1f} tok/s  "
        f"TTFT p50 {row['ttft_p50_s'] * 1e3:6.0f} ms  ITL p50 {row['itl_p50_s'] * 1e3:6.1f} ms"
    )


def run(
    p: GenerationPlan,
    workdir: Path,
    choice: tuple[str, str] | None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    missing = available()
    if missing:
        log(f"  skipped: {missing}")
        return {"skipped": missing, "plan": asdict(p)}
    from transformers.utils import logging as hf_logging

    from exporters.export import ExportRequest, export

    hf_logging.disable_progress_bar()  # per-call progress bars would flood the bench log
    workdir.mkdir(parents=True, exist_ok=True)
    src, ckpt = make_bloom(workdir, p.trained_context)
    fmt, precision = choice or DEFAULT_PATH
    store = workdir / "store"
    if (store / "bloom").is_dir():
        import shutil

        shutil.rmtree(store / "bloom")
    started = time.perf_counter()
    logging.disable(logging.WARNING)  # ORT's int8 quantizer hints on the root logger
    try:
        result = export(
            ExportRequest(
                checkpoint=ckpt,
                store=store,
                name="bloom",
                format=fmt,
                precision=precision,
                progress=False,
            )
        )
    finally:
        logging.disable(logging.NOTSET)
    log(f"  imported + exported bloom ({fmt} {precision}) in {time.perf_counter() - started:.0f} s")
    texts = prompts(src / "tokenizer.json", max(*p.streams, p.single_requests), p.prompt_tokens)

    # The peers are loaded first and run right after Longhaul at each level (the server idles
    # meanwhile), so both sides of each comparison are measured under the same background load.
    peers = {f"transformers generate() {d}": HFPeer(src, d) for d in p.hf_dtypes}
    for peer in peers.values():
        peer.generate(texts[:1], p.max_new_tokens)  # warm-up: allocations, kernel choice
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "service", "--store", str(store), "--port", str(port)]
    ours = f"longhaul {fmt}-{precision}"
    levels: dict[str, list[dict[str, Any]]] = {ours: [], **{label: [] for label in peers}}
    agreement: dict[str, int] = {}
    with server_process(cmd, {"LONGHAUL_LOG_LEVEL": "warning"}, workdir / "longhaul.log") as proc:
        wait_ready(f"{base}/health/ready", 300, lambda: proc.poll() is None)
        asyncio.run(_longhaul_level(base, "bloom", texts[:1], 1, p))  # warm-up
        for streams in p.streams:
            batch = texts[: p.single_requests] if streams == 1 else texts[:streams]
            before = _server_token_histograms(base)
            row, texts_longhaul = asyncio.run(_longhaul_level(base, "bloom", batch, streams, p))
            after = _server_token_histograms(base)
            for key, name in (
                ("server_ttft_mean_s", "longhaul_time_to_first_token_seconds"),
                ("server_itl_mean_s", "longhaul_inter_token_latency_seconds"),
            ):
                count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
                total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
                row[key] = total / count if count else None
            levels[ours].append(row)
            _log_level(log, ours, streams, row)
            for label, peer in peers.items():
                row, texts_peer = peer.level(batch, streams, p)
                levels[label].append(row)
                _log_level(log, label, streams, row)
                if streams == 1:
                    agreement[label] = sum(
                        a == b for a, b in zip(texts_peer, texts_longhaul, strict=True)
                    )
    return {
        "plan": asdict(p),
        "size": asdict(REALISTIC),
        "path": {"format": fmt, "precision": precision},
        "parity": result.report.summary(),
        "max_context": result.published.manifest.max_context,
        "levels": levels,
        "greedy_text_identical_at_1_stream": {
            k: f"{v}/{p.single_requests}" for k, v in agreement.items()
        },
    }
