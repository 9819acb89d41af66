"""Generation benchmark: continuous batching on an in-process GenerationEngine.

    python -m benchmarks.generation --store STORE --model NAME [--quick] [--out PATH]

Three measurements, all on one ``kv_cache`` (ALiBi) model, timed where a client would see them
(the moment each token chunk reaches the asyncio consumer):

1. throughput — aggregate generated tokens/s with 1, 4 and 16 concurrent streams;
2. context — inter-token latency (ITL) of one stream whose context is 256 vs 4096 tokens;
3. interference — 8 streams decoding while a long prompt (16K tokens) arrives: their ITL
   p50/p99 before it and during its chunked prefill (``settings.prefill_chunk_tokens``, and
   ``settings.prefill_chunk_pairs``, which shrinks late chunks; also without it); and,
   at a shorter prompt that an unchunked prefill can still hold in memory, chunked against
   prefill in one piece, which shows what chunking buys the running streams.

``--context-limit N`` lifts the manifest's ``max_context`` to N in memory for this run only: an
ALiBi graph has no position table and runs at any length, and this benchmark measures time, not
the quality the exporter's extrapolation sweep verified ``max_context`` for.

Prompts are random token ids (exact lengths, no tokenizer effects), decoding is greedy. A
measurement whose context does not fit the model's ``max_context`` is reported as skipped.
ITL is client-visible: with a tiny model a decode step takes well under a millisecond and
several steps' tokens can reach the event loop in one wake-up (the worker thread and the loop
share the GIL), so p50 can read ~0 while p99 shows the coalescing; with real model sizes a step
is long enough for every token to arrive on its own.
Prints a table and writes JSON (raw samples included) to benchmarks/results/generation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: make `benchmarks` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, machine_info, percentile, write_json
from model_store import ModelRepository
from service.engine.generation import GenerationEngine, GenerationStream
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings

FIRST_REGULAR_ID = 4  # contracts.md: ids 0-3 are <pad>, <eos>, <mask>, <cls>
UNBOUNDED_PAIRS = 2**62  # prefill_chunk_pairs that never binds: chunks of prefill_chunk tokens


@dataclass(frozen=True)
class Plan:
    concurrencies: tuple[int, ...] = (1, 4, 16)
    throughput_prompt: int = 128
    throughput_new: int = 128
    contexts: tuple[int, ...] = (256, 1024, 4096, 16384)
    context_new: int = 64
    streams: int = 8
    stream_prompt: int = 64
    long_prompt: int = 16384
    # Unchunked prefill materialises (heads × n × n) scores per layer: 4096 tokens is ~0.3 GB,
    # 16K would be ~4 GB per tensor, so the chunked-vs-one-piece comparison runs at this length.
    compare_prompt: int = 4096
    prefill_chunk: int = 512


QUICK = Plan(
    throughput_new=32, contexts=(256, 2048), context_new=16, long_prompt=2048, compare_prompt=1024
)


@dataclass
class StreamTrace:
    """Arrival times (perf_counter) of every chunk of one stream."""

    arrivals: list[float]
    tokens: int

    def gaps(self, start: float = 0.0, end: float = float("inf")) -> list[float]:
        """Inter-token gaps overlapping [start, end]; a stall spanning the window counts."""
        pairs = itertools.pairwise(self.arrivals)
        return [b - a for a, b in pairs if b > start and a < end]


def prompt_ids(length: int, vocab: int, rng: np.random.Generator) -> list[int]:
    return [int(i) for i in rng.integers(FIRST_REGULAR_ID, vocab, size=length)]


async def trace(stream: GenerationStream, into: StreamTrace | None = None) -> StreamTrace:
    """Record chunk arrivals into ``into`` (readable while the stream runs)."""
    result = into if into is not None else StreamTrace([], 0)
    async for chunk in stream:
        result.arrivals.append(time.perf_counter())
        result.tokens += len(chunk.token_ids)
    return result


class Bench:
    def __init__(self, model: LoadedModel, base: Settings, seed: int) -> None:
        self.model = model
        self.base = base
        self.vocab = int(model.manifest.config["vocab_size"])
        self.max_context = model.manifest.max_context
        self.rng = np.random.default_rng(seed)

    async def engine(self, **overrides: Any) -> GenerationEngine:
        settings = self.base.model_copy(update=overrides)
        engine = GenerationEngine(self.model, settings, Metrics())
        await engine.start()
        await engine.warmup()
        return engine

    def fits(self, prompt: int, new: int) -> bool:
        return prompt + new <= self.max_context

    async def throughput(self, plan: Plan) -> list[dict[str, Any]]:
        rows = []
        for c in plan.concurrencies:
            if not self.fits(plan.throughput_prompt, plan.throughput_new):
                rows.append({"streams": c, "skipped": f"max_context {self.max_context}"})
                continue
            engine = await self.engine(max_num_seqs=max(c, self.base.max_num_seqs))
            params = SamplingParams(max_new_tokens=plan.throughput_new, temperature=0)
            started = time.perf_counter()
            streams = [
                await engine.submit(
                    prompt_ids(plan.throughput_prompt, self.vocab, self.rng), params
                )
                for _ in range(c)
            ]
            traces = await asyncio.gather(*(trace(s) for s in streams))
            wall = time.perf_counter() - started
            await engine.stop()
            tokens = sum(t.tokens for t in traces)
            itl = [g for t in traces for g in t.gaps()]
            rows.append(
                {
                    "streams": c,
                    "prompt_tokens": plan.throughput_prompt,
                    "generated_tokens": tokens,
                    "wall_s": wall,
                    "tokens_per_s": tokens / wall,
                    "itl_p50_s": percentile(itl, 50),
                    "itl_p99_s": percentile(itl, 99),
                }
            )
        return rows

    async def context(self, plan: Plan) -> list[dict[str, Any]]:
        rows = []
        for ctx in plan.contexts:
            if not self.fits(ctx, plan.context_new):
                rows.append({"context": ctx, "skipped": f"max_context {self.max_context}"})
                continue
            engine = await self.engine()
            params = SamplingParams(max_new_tokens=plan.context_new, temperature=0)
            submitted = time.perf_counter()
            stream = await engine.submit(prompt_ids(ctx, self.vocab, self.rng), params)
            result = await trace(stream)
            await engine.stop()
            itl = result.gaps()
            rows.append(
                {
                    "context": ctx,
                    "ttft_s": result.arrivals[0] - submitted,
                    "itl_p50_s": percentile(itl, 50),
                    "itl_p99_s": percentile(itl, 99),
                    "itl_samples_s": [round(g, 6) for g in itl],
                }
            )
        return rows

    async def interference(self, plan: Plan) -> list[dict[str, Any]]:
        long_prompt = min(plan.long_prompt, self.max_context - 1)
        compare = min(plan.compare_prompt, long_prompt)
        unbounded, pairs = UNBOUNDED_PAIRS, self.base.prefill_chunk_pairs
        runs = [
            ("chunked", plan.prefill_chunk, pairs, long_prompt),
            ("chunked, no pair budget", plan.prefill_chunk, unbounded, long_prompt),
        ]
        if compare != long_prompt:
            runs.append(("chunked", plan.prefill_chunk, pairs, compare))
        runs.append(("one piece", compare, unbounded, compare))
        return [await self._interference(plan, *run) for run in runs]

    async def _interference(
        self, plan: Plan, label: str, chunk: int, pairs: int, long_prompt: int
    ) -> dict[str, Any]:
        # Long enough that every stream is still decoding when the long prefill ends.
        new = self.max_context - plan.stream_prompt
        engine = await self.engine(
            prefill_chunk_tokens=max(chunk, 16), prefill_chunk_pairs=max(pairs, 256)
        )
        params = SamplingParams(max_new_tokens=new, temperature=0)
        streams = [
            await engine.submit(prompt_ids(plan.stream_prompt, self.vocab, self.rng), params)
            for _ in range(plan.streams)
        ]
        traces = [StreamTrace([], 0) for _ in streams]
        tasks = [asyncio.ensure_future(trace(s, t)) for s, t in zip(streams, traces, strict=True)]
        # Let them settle into steady decoding, then measure a baseline window.
        while engine.stats().decoding < plan.streams:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.3)
        baseline_start = time.perf_counter()
        await asyncio.sleep(0.5)
        long_submitted = time.perf_counter()
        long = await engine.submit(
            prompt_ids(long_prompt, self.vocab, self.rng),
            SamplingParams(max_new_tokens=1, temperature=0),
        )
        long_done = (await trace(long)).arrivals[0]
        # The gap that spans the end of the prefill closes with each stream's next token.
        while any(t.arrivals[-1] <= long_done for t in traces):
            await asyncio.sleep(0.001)
        for s in streams:
            s.cancel()  # ends each trace() loop at once
        await asyncio.gather(*tasks)
        await engine.stop()
        before = [g for t in traces for g in t.gaps(baseline_start, long_submitted)]
        during = [g for t in traces for g in t.gaps(long_submitted, long_done)]
        return {
            "prefill": label,
            "prefill_chunk_tokens": chunk,
            "prefill_chunk_pairs": pairs if pairs < UNBOUNDED_PAIRS else None,
            "streams": plan.streams,
            "long_prompt_tokens": long_prompt,
            "long_prompt_ttft_s": long_done - long_submitted,
            "itl_before_p50_s": percentile(before, 50),
            "itl_before_p99_s": percentile(before, 99),
            "itl_during_p50_s": percentile(during, 50),
            "itl_during_p99_s": percentile(during, 99),
            "itl_during_max_s": max(during, default=float("nan")),
            "itl_during_samples": len(during),
        }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def print_tables(results: dict[str, Any]) -> None:
    print(
        f"\nmodel {results['model']['name']}/{results['model']['version']} "
        f"({results['model']['format']}, {results['model']['provider']})"
    )
    print("\nthroughput      streams   tokens/s   ITL p50 ms   ITL p99 ms")
    for row in results["throughput"]:
        if "skipped" in row:
            print(f"{'':16}{row['streams']:7}   skipped: {row['skipped']}")
            continue
        print(
            f"{'':16}{row['streams']:7}   {row['tokens_per_s']:8.1f}   {ms(row['itl_p50_s'])}"
            f"     {ms(row['itl_p99_s'])}"
        )
    print("\ncontext         tokens    TTFT ms   ITL p50 ms   ITL p99 ms")
    for row in results["context"]:
        if "skipped" in row:
            print(f"{'':16}{row['context']:6}   skipped: {row['skipped']}")
            continue
        print(
            f"{'':16}{row['context']:6}   {ms(row['ttft_s'])}   {ms(row['itl_p50_s'])}     "
            f"{ms(row['itl_p99_s'])}"
        )
    print("\ninterference    prefill     long TTFT ms   ITL p50/p99 before ms   during ms")
    for row in results["interference"]:
        print(
            f"{'':16}{row['prefill']:10}  {ms(row['long_prompt_ttft_s'])}       "
            f"{ms(row['itl_before_p50_s'])} /{ms(row['itl_before_p99_s'])}"
            f"   {ms(row['itl_during_p50_s'])} /{ms(row['itl_during_p99_s'])}"
        )


def context_limit(plan: Plan) -> int:
    """The longest context a plan serves: its longest prompt plus the tokens generated on it."""
    return max(plan.long_prompt + 1, max(plan.contexts) + plan.context_new)


def demo_store(workdir: Path, log: Callable[[str], None] = print) -> tuple[Path, str, str]:
    """The ALiBi demo model exported fp32 ONNX into ``workdir``/store as ``alibi-demo``
    (``checkpoints/alibi`` from ``make models`` when present, else trained once, ~2 min, into
    ``workdir``'s parent, where the other sections' work folders find it); returns the store,
    the checkpoint used and the export's parity summary."""
    from exporters.export import ExportRequest, export
    from exporters.training import train

    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = ROOT / "checkpoints" / "alibi"
    if not (checkpoint / "model.safetensors").is_file():
        checkpoint = workdir.parent / "alibi-demo-checkpoint"
        if not (checkpoint / "model.safetensors").is_file():
            log("  training the ALiBi demo model (python -m exporters train --preset demo)")
            train("alibi", "demo", checkpoint, progress=False)
    store = workdir / "store"
    shutil.rmtree(store / "alibi-demo", ignore_errors=True)
    started = time.perf_counter()
    exported = export(
        ExportRequest(
            checkpoint=checkpoint, store=store, name="alibi-demo", format="onnx", progress=False
        )
    )
    log(f"  exported {checkpoint} in {time.perf_counter() - started:.0f} s: {exported.summary()}")
    shown = checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint
    return store, str(shown), exported.report.summary()


def section(
    quick: bool, threads: int, workdir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """``make bench``'s engine section: the ALiBi demo model (:func:`demo_store`)."""
    store, checkpoint, parity = demo_store(workdir, log)
    plan = QUICK if quick else Plan()
    args = argparse.Namespace(
        store=store,
        model="alibi-demo",
        version=None,
        threads=threads,
        seed=0,
        quick=quick,
        context_limit=context_limit(plan),
    )
    results = asyncio.run(run(args))
    results["checkpoint"] = checkpoint
    results["parity"] = parity
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    settings = Settings(store=args.store, intra_op_threads=args.threads, warmup=True)
    model = load_model(ModelRepository(args.store), args.model, args.version, settings)
    if model.manifest.signature.generation_mode != "kv_cache":
        raise SystemExit(f"{args.model} is not a kv_cache decoder; this benchmark needs one")
    verified_context = model.manifest.max_context
    if args.context_limit is not None:
        if model.manifest.architecture != "alibi":
            raise SystemExit("--context-limit is for ALiBi models (no position table)")
        model.manifest = model.manifest.model_copy(update={"max_context": args.context_limit})
    bench = Bench(model, settings, args.seed)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "model": {
            "name": model.name,
            "version": model.version,
            "format": model.manifest.format,
            "precision": model.manifest.precision,
            "provider": model.backend.provider,
            "max_context": model.manifest.max_context,
            "verified_max_context": verified_context,
            "config": model.manifest.config,
        },
        "plan": plan.__dict__,
        "settings": {"intra_op_threads": args.threads, "max_num_seqs": settings.max_num_seqs},
    }
    sections = [
        ("throughput", bench.throughput),
        ("context", bench.context),
        ("interference", bench.interference),
    ]
    for name, measure in tqdm(sections, desc="generation benchmark", unit="section"):
        results[name] = await measure(plan)
    model.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="model store root")
    parser.add_argument("--model", required=True, help="an ALiBi (kv_cache) model in the store")
    parser.add_argument("--version", type=int, default=None, help="default: the highest")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads")
    parser.add_argument("--seed", type=int, default=0, help="prompt token ids")
    parser.add_argument("--quick", action="store_true", help="fewer tokens, shorter long prompt")
    parser.add_argument(
        "--context-limit",
        type=int,
        default=None,
        help="ALiBi only: serve up to this many tokens in this run (default: manifest max_context)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "generation.json")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    print_tables(results)
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
