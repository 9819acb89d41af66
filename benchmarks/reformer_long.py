"""HF's crime-and-punishment Reformer shape served at 16K and 64K tokens.

``python -m benchmarks.reformer_long [--lengths 16384 65536] [--max-context 16384]
[--graph-lengths 16384 65536] [--workdir DIR | --store DIR]``

A ``ReformerModelWithLMHead`` with google/reformer-crime-and-punishment's exact configuration
(random weights: the figures are about cost, not text) and a sentencepiece vocabulary trained
here is saved with ``save_pretrained``, imported with default options, exported twice to ONNX in
fp32 at ``--max-context`` (as the LM, and ``--task encode``; int8 misses this model's parity
floor, so ``--precision auto`` would export, probe and fail it first), and served by
``python -m service``. Per served length: TTFT of a streamed ``/v1/completions`` (time to the
first token's event), decode tokens/s after it, the latency of ``/v1/encode``, and the server's
peak RSS (VmHWM) after each. A length past the served max_context is recorded as skipped.

The imported Reformer has no kv-cache graph (HF's chunking lets later tokens move earlier
ones' chunks), so the service decodes by full-sequence recompute: every new token is one
forward of the whole prompt. ``--graph-lengths`` times that forward on the exported LM graph
itself (ONNX Runtime, batch 1, a child process per length for its peak RSS), so the cost of a
decode step is measured at lengths the store is not verified for.
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
# The prompt leaves room for the new tokens and for re-tokenisation of the decoded text.
PROMPT_MARGIN = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*args: str | Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True)
    return time.perf_counter() - started


def build(workdir: Path, max_context: int) -> tuple[Path, dict[str, float]]:
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
            "--name", name, "--max-context", str(max_context), "--task", task,
            "--precision", "fp32",
        )  # fmt: skip
    return store, timings


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _prompt(tokenizer_file: Path, tokens: int) -> str:
    """The stdlib text repeated, cut to ``tokens`` pieces of the model's own tokenizer and
    decoded; the server reports the exact count."""
    from tokenizers import Tokenizer

    from tests.exporters.importers.test_hf_reformer_published import _text

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    text = _text(400_000)
    ids = tokenizer.encode(text * (1 + tokens * 3 // len(text))).ids
    return str(tokenizer.decode(ids[:tokens]))


def measure(store: Path, lengths: list[int]) -> list[dict[str, Any]]:
    from model_store import ModelRepository

    version = ModelRepository(store).resolve("crime")
    served = version.manifest.max_context
    port = _free_port()
    env = {
        **os.environ,
        # one 64K-token encode row must fit one batch's cost budget
        "LONGHAUL_BATCH_COST_BUDGET": "1e12",
        "LONGHAUL_MAX_BODY_BYTES": str(64 << 20),
        # a 64K completion is NEW_TOKENS whole-prompt forwards: minutes on two cores
        "LONGHAUL_REQUEST_TIMEOUT_SECONDS": "3600",
        # the two models are used one at a time here: each gets every core
        "LONGHAUL_INTRA_OP_THREADS": str(len(os.sched_getaffinity(0))),
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
                if length > served:
                    rows.append({"target_tokens": length, "skipped": f"past max_context {served}"})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                prompt = _prompt(version.path / "tokenizer.json", length - PROMPT_MARGIN)
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


_GRAPH_STEP = """
import json, resource, sys, time
import numpy as np
from exporters.runtime import OnnxRunner
runner = OnnxRunner(sys.argv[1], ["logits", "hidden"])
ids = np.random.default_rng(0).integers(4, 320, size=(1, int(sys.argv[2])), dtype=np.int64)
inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
times = []
for _ in range(2):
    started = time.perf_counter()
    runner.run(inputs)
    times.append(time.perf_counter() - started)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"length": ids.shape[1], "forward_s": [round(t, 2) for t in times],
                  "peak_rss_mib": round(peak)}))
"""


def graph_steps(store: Path, lengths: list[int]) -> list[dict[str, Any]]:
    """One full-sequence forward of the LM graph per length, twice (the second is warm), in a
    child process each: what one decode step of full-sequence recompute costs there."""
    from model_store import ModelRepository

    model = ModelRepository(store).resolve("crime").model_path
    rows = []
    for length in lengths:
        done = subprocess.run(
            [sys.executable, "-c", _GRAPH_STEP, str(model), str(length)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument(
        "--max-context", type=int, default=16384,
        help="the exports' max_context (parity runs there); served lengths past it are skipped. "
        "Past 16384 parity may fail on LSH hashing ties, by chance (docs/decisions.md)",
    )  # fmt: skip
    parser.add_argument(
        "--graph-lengths", type=int, nargs="*", default=[16384, 65536],
        help="time one full-sequence forward of the LM graph at these lengths",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=SCRATCH / "reformer_long")
    parser.add_argument(
        "--store", type=Path, default=None,
        help="serve this store's 'crime' and 'crime-encode' (as the README's commands publish "
        "them) instead of building one in --workdir",
    )  # fmt: skip
    args = parser.parse_args()
    machine = machine_info()  # at the start: its load average is the one before the run
    if args.store is None:
        store, timings = build(args.workdir, args.max_context)
        max_context = args.max_context
    else:
        from model_store import ModelRepository

        store, timings = args.store, {}
        repo = ModelRepository(store)
        # The store's own verified lengths (a default export chooses them), not --max-context.
        max_context = min(repo.resolve(n).manifest.max_context for n in ("crime", "crime-encode"))
    rows = measure(store, args.lengths)
    steps = graph_steps(store, args.graph_lengths)
    out = {
        "machine": machine,
        "build": timings,
        "max_context": max_context,
        "rows": rows,
        "graph_steps": steps,
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reformer_long.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'reformer_long.json'}")


if __name__ == "__main__":
    main()
