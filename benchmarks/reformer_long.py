"""HF's crime-and-punishment Reformer shape served at 16K and 64K tokens.

``python -m benchmarks.reformer_long [--lengths 16384 65536] [--workdir DIR | --store DIR]``

A ``ReformerModelWithLMHead`` with google/reformer-crime-and-punishment's exact configuration
(random weights: the figures are about cost, not text) and a sentencepiece vocabulary trained
here is saved with ``save_pretrained``, imported with default options, exported twice to ONNX at
max_context 65536 (as the LM, and ``--task encode``), and served by ``python -m service``. Per
length: TTFT of a streamed ``/v1/completions`` (time to the first token's event), decode
tokens/s after it, the latency of ``/v1/encode``, and the server's peak RSS (VmHWM) after each.
Writes benchmarks/results/reformer_long.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS, SCRATCH, machine_info

NEW_TOKENS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str | Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True)
    return time.perf_counter() - started


def build(workdir: Path) -> tuple[Path, dict[str, float]]:
    """Reference model + spiece -> import -> two ONNX versions; returns the store and timings."""
    import sentencepiece
    import torch
    from transformers import ReformerConfig, ReformerModelWithLMHead

    from tests.exporters.importers.conftest import trained_scale
    from tests.exporters.importers.test_hf_reformer_published import CRIME_AND_PUNISHMENT, _text

    src, ckpt, store = workdir / "src", workdir / "ckpt", workdir / "store"
    shutil.rmtree(workdir, ignore_errors=True)
    torch.manual_seed(0)
    model = trained_scale(ReformerModelWithLMHead(ReformerConfig(**CRIME_AND_PUNISHMENT)), 11)
    model.save_pretrained(src)
    lines = [line for line in _text(60_000).splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(src / "spiece"), vocab_size=320,
        model_type="bpe", pad_id=0, unk_id=1, eos_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    (src / "spiece.vocab").unlink()
    timings = {
        "import_s": _run("-m", "exporters", "import", "hf-reformer", str(src), "--out", str(ckpt))
    }
    for name, task in (("crime", "generate"), ("crime-encode", "encode")):
        timings[f"export_{task}_s"] = _run(
            "-m", "exporters", "export", str(ckpt), "--format", "onnx", "--store", str(store),
            "--name", name, "--max-context", "65536", "--task", task,
        )  # fmt: skip
    return store, timings


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _prompt(tokens: int) -> str:
    """Text of about ``tokens`` pieces: the stdlib text repeated (a 320-piece vocabulary gives
    about 2.3 characters a piece); the server reports the exact count."""
    from tests.exporters.importers.test_hf_reformer_published import _text

    text = _text(400_000)
    return (text * (1 + tokens * 3 // len(text)))[: int(tokens * 2.3)]


def measure(store: Path, lengths: list[int]) -> list[dict[str, Any]]:
    port = _free_port()
    env = {
        **os.environ,
        "LONGHAUL_BATCH_COST_BUDGET": "1e12",
        "LONGHAUL_MAX_BODY_BYTES": str(64 << 20),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "service", "--store", str(store), "--host", "127.0.0.1",
         "--port", str(port)], env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        with httpx.Client(base_url=base, timeout=1800) as client:
            for _ in range(600):
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            idle_rss = _peak_rss_mib(server.pid)
            for length in lengths:
                prompt = _prompt(length)
                body = {"model": "crime", "prompt": prompt, "max_tokens": NEW_TOKENS,
                        "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}  # fmt: skip
                started = time.perf_counter()
                first = None
                usage: dict[str, Any] = {}
                with client.stream("POST", "/v1/completions", json=body) as response:
                    response.raise_for_status()
                    for line in response.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if event.get("choices") and first is None:
                            first = time.perf_counter() - started
                        usage = event.get("usage") or usage
                total = time.perf_counter() - started
                completion_rss = _peak_rss_mib(server.pid)
                started = time.perf_counter()
                encoded = client.post(
                    "/v1/encode", json={"model": "crime-encode", "inputs": [prompt]}
                )
                encode_s = time.perf_counter() - started
                encoded.raise_for_status()
                assert first is not None
                done = usage.get("completion_tokens", NEW_TOKENS)
                rows.append({
                    "target_tokens": length,
                    "prompt_tokens": usage.get("prompt_tokens"),
                    "completion_tokens": done,
                    "ttft_s": round(first, 2),
                    "decode_tokens_per_s": round((done - 1) / (total - first), 3),
                    "completion_total_s": round(total, 2),
                    "encode_s": round(encode_s, 2),
                    "encode_prompt_tokens": encoded.json()["usage"]["prompt_tokens"],
                    "peak_rss_mib_after_completion": round(completion_rss),
                    "peak_rss_mib_after_encode": round(_peak_rss_mib(server.pid)),
                    "idle_rss_mib": round(idle_rss),
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--workdir", type=Path, default=SCRATCH / "reformer_long")
    parser.add_argument(
        "--store", type=Path, default=None,
        help="serve this store's 'crime' and 'crime-encode' (as the README's commands publish "
        "them) instead of building one in --workdir",
    )  # fmt: skip
    args = parser.parse_args()
    if args.store is None:
        store, timings = build(args.workdir)
    else:
        store, timings = args.store, {}
    rows = measure(store, args.lengths)
    out = {"machine": machine_info(), "build": timings, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reformer_long.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'reformer_long.json'}")


if __name__ == "__main__":
    main()
