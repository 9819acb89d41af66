"""Prefix-caching benchmark: a long shared document on an in-process GenerationEngine.

    python -m benchmarks.prefix_cache --store STORE --model NAME [--quick] [--out PATH]

On one ``kv_cache`` (ALiBi) model, prompts of random token ids, greedy decoding, timed where a
client sees the first token (the asyncio consumer):

1. follow-ups — a 16,384-token document plus a 32-token question, then 8 requests with the same
   document and other 32-token questions, one after another: each one's time to first token
   (TTFT) against the first's (the goal: >= 20x lower);
2. shared — 16 such requests at once: aggregate generated tokens/s with the cache off, with it on
   and nothing cached yet (the first prefill's blocks are picked up by the other 15 while they
   wait), and with it on and the document already cached;
3. overhead — nothing shared (16 streams of random prompts): tokens/s with the cache on against
   off, alternating runs, the median ratio (the goal: within 3%).

``--context-limit`` as in benchmarks/generation.py: the demo model's verified ``max_context``
(2,048) is lifted in memory to the document's length, since this measures time, not quality.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
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

from benchmarks.common import RESULTS, machine_info, write_json
from benchmarks.generation import demo_store, prompt_ids
from model_store import ModelRepository
from service.engine.generation import GenerationEngine
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings


@dataclass(frozen=True)
class Plan:
    document: int = 16384
    question: int = 32
    follow_ups: int = 8
    follow_up_new: int = 8
    shared_requests: int = 16
    shared_new: int = 32
    overhead_streams: int = 16
    overhead_prompt: int = 256
    overhead_new: int = 64
    overhead_repeats: int = 3


QUICK = Plan(document=2048, follow_ups=4, shared_requests=8, shared_new=16, overhead_repeats=2)


def context_limit(plan: Plan) -> int:
    return plan.document + plan.question + max(plan.follow_up_new, plan.shared_new)


class Bench:
    def __init__(self, model: LoadedModel, base: Settings, seed: int) -> None:
        self.model = model
        self.base = base
        self.vocab = int(model.manifest.config["vocab_size"])
        self.rng = np.random.default_rng(seed)

    def ids(self, n: int) -> list[int]:
        return prompt_ids(n, self.vocab, self.rng)

    async def engine(self, **overrides: Any) -> tuple[GenerationEngine, Metrics]:
        metrics = Metrics()
        engine = GenerationEngine(self.model, self.base.model_copy(update=overrides), metrics)
        await engine.start()
        await engine.warmup()
        return engine, metrics

    async def _ttft(self, engine: GenerationEngine, prompt: list[int], new: int) -> float:
        submitted = time.perf_counter()
        stream = await engine.submit(prompt, SamplingParams(max_new_tokens=new, temperature=0))
        first = None
        async for _ in stream:
            first = first or time.perf_counter()
        assert first is not None
        return first - submitted

    async def follow_ups(self, plan: Plan) -> dict[str, Any]:
        document = self.ids(plan.document)
        questions = [self.ids(plan.question) for _ in range(plan.follow_ups + 1)]
        engine, metrics = await self.engine(max_num_seqs=max(16, self.base.max_num_seqs))
        first = await self._ttft(engine, document + questions[0], plan.follow_up_new)
        rest = [await self._ttft(engine, document + q, plan.follow_up_new) for q in questions[1:]]
        hits = sample(metrics, "prefix_cache_hit_tokens_total", self.model.name)
        stored = engine.stats().prefix_cache_bytes
        await engine.stop()
        # The same follow-up with the cache off: what a follow-up costs without it.
        engine, _ = await self.engine(prefix_cache=False)
        cold = await self._ttft(engine, document + questions[1], plan.follow_up_new)
        await engine.stop()
        return {
            "document_tokens": plan.document,
            "question_tokens": plan.question,
            "first_ttft_s": first,
            "follow_up_ttft_s": rest,
            "follow_up_ttft_median_s": statistics.median(rest),
            "speedup_median": first / statistics.median(rest),
            "speedup_worst": first / max(rest),
            "follow_up_cache_off_ttft_s": cold,
            "hit_tokens": hits,
            "prefix_cache_bytes": stored,
        }

    async def _at_once(
        self, prompts: list[list[int]], new: int, warm: list[int] | None, **overrides: Any
    ) -> dict[str, Any]:
        engine, metrics = await self.engine(max_num_seqs=len(prompts), **overrides)
        if warm is not None:
            await self._ttft(engine, warm, 1)
        params = SamplingParams(max_new_tokens=new, temperature=0)
        started = time.perf_counter()
        streams = [await engine.submit(p, params) for p in prompts]
        results = await asyncio.gather(*(s.collect() for s in streams))
        wall = time.perf_counter() - started
        hits = sample(metrics, "prefix_cache_hit_tokens_total", self.model.name)
        await engine.stop()
        tokens = sum(r.completion_tokens for r in results)
        return {
            "requests": len(prompts),
            "generated_tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "hit_tokens": hits,
        }

    async def shared(self, plan: Plan) -> list[dict[str, Any]]:
        document = self.ids(plan.document)
        prompts = [document + self.ids(plan.question) for _ in range(plan.shared_requests)]
        warm = document + self.ids(plan.question)
        runs = [
            ("cache off", {"prefix_cache": False}, None),
            ("cache on, nothing cached", {}, None),
            ("cache on, document cached", {}, warm),
        ]
        rows = []
        for label, overrides, warm_prompt in runs:
            row = await self._at_once(prompts, plan.shared_new, warm_prompt, **overrides)
            rows.append({"run": label, **row})
        return rows

    async def overhead(self, plan: Plan) -> dict[str, Any]:
        ratios, on_runs, off_runs = [], [], []
        for _ in range(plan.overhead_repeats):
            prompts = [self.ids(plan.overhead_prompt) for _ in range(plan.overhead_streams)]
            off = await self._at_once(prompts, plan.overhead_new, None, prefix_cache=False)
            on = await self._at_once(prompts, plan.overhead_new, None)
            off_runs.append(off["tokens_per_s"])
            on_runs.append(on["tokens_per_s"])
            ratios.append(on["tokens_per_s"] / off["tokens_per_s"])
        return {
            "streams": plan.overhead_streams,
            "prompt_tokens": plan.overhead_prompt,
            "new_tokens": plan.overhead_new,
            "tokens_per_s_on": on_runs,
            "tokens_per_s_off": off_runs,
            "ratio_on_off": ratios,
            "ratio_median": statistics.median(ratios),
        }


def sample(metrics: Metrics, name: str, model: str) -> float:
    value = metrics.registry.get_sample_value(f"longhaul_{name}", {"model": model})
    return 0.0 if value is None else value


def print_tables(results: dict[str, Any]) -> None:
    if "follow_ups" in results:
        _print_follow_ups(results["follow_ups"])
    if "shared" in results:
        _print_shared(results["shared"])
    if "overhead" in results:
        _print_overhead(results["overhead"])


def _print_follow_ups(f: dict[str, Any]) -> None:
    print(f"\nfollow-ups on a {f['document_tokens']}-token document (TTFT ms)")
    print(f"  first {f['first_ttft_s'] * 1e3:9.1f}")
    for i, s in enumerate(f["follow_up_ttft_s"], 1):
        print(f"  {i:5} {s * 1e3:9.1f}   {f['first_ttft_s'] / s:6.1f}x lower")
    print(f"  cache off, a follow-up: {f['follow_up_cache_off_ttft_s'] * 1e3:.1f}")


def _print_shared(rows: list[dict[str, Any]]) -> None:
    print("\nshared document, requests at once     tokens/s   wall s   hit tokens")
    for row in rows:
        print(
            f"  {row['run']:<32} {row['tokens_per_s']:9.1f} {row['wall_s']:8.2f}   "
            f"{row['hit_tokens']:.0f}"
        )


def _print_overhead(o: dict[str, Any]) -> None:
    print(
        f"\nnothing shared ({o['streams']} streams of {o['prompt_tokens']} random tokens): "
        f"tokens/s on/off {', '.join(f'{r:.3f}' for r in o['ratio_on_off'])}, "
        f"median {o['ratio_median']:.3f}"
    )


def markdown(section: dict[str, Any], images: list[str], img_rel: str) -> list[str]:
    """docs/benchmarks.md's section (benchmarks/report.py)."""
    f, o, plan = section["follow_ups"], section["overhead"], section["plan"]
    model = section["model"]
    lines = [
        "## 7. Prefix caching",
        "",
        f"The ALiBi demo model ({model['name']}, {model['format']} {model['precision']}, "
        f"{model['provider']}), driven in process by `python -m benchmarks.prefix_cache` "
        f"(`{section['settings']['intra_op_threads']}` intra-op threads; block "
        f"{section['settings']['prefix_cache_block_tokens']} tokens). Random-token prompts, "
        f"greedy decoding; max_context lifted in memory to {model['max_context']:,} as in §5.",
        "",
        f"A {f['document_tokens']:,}-token document plus a {f['question_tokens']}-token question, "
        f"then {len(f['follow_up_ttft_s'])} requests with the same document and other questions, "
        "one after another:",
        "",
        "| request | TTFT ms | first / this |",
        "|---|---|---|",
        f"| first (cold) | {f['first_ttft_s'] * 1e3:,.0f} | 1.0× |",
        *(
            f"| follow-up {i} | {s * 1e3:,.1f} | {f['first_ttft_s'] / s:,.0f}× |"
            for i, s in enumerate(f["follow_up_ttft_s"], 1)
        ),
        f"| a follow-up, cache off | {f['follow_up_cache_off_ttft_s'] * 1e3:,.0f} | "
        f"{f['first_ttft_s'] / f['follow_up_cache_off_ttft_s']:.1f}× |",
        "",
        f"{plan['shared_requests']} requests at once on one document ({plan['shared_new']} new "
        "tokens each):",
        "",
        "| run | tokens/s | wall s | prompt tokens reused |",
        "|---|---|---|---|",
        *(
            f"| {r['run']} | {r['tokens_per_s']:,.1f} | {r['wall_s']:,.2f} | "
            f"{r['hit_tokens']:,.0f} |"
            for r in section["shared"]
        ),
        "",
        f"Nothing shared ({o['streams']} streams of {o['prompt_tokens']} random tokens, "
        f"{o['new_tokens']} new tokens; cache on/off alternating, {len(o['ratio_on_off'])} "
        f"pairs): tokens/s on / off = {', '.join(f'{r:.3f}' for r in o['ratio_on_off'])}, "
        f"median {o['ratio_median']:.3f}.",
        "",
    ]
    return lines


def section(
    quick: bool, threads: int, workdir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """``make bench``'s prefix section: the ALiBi demo model, as the engine section gets it."""
    store, checkpoint, parity = demo_store(workdir, log)
    plan = QUICK if quick else Plan()
    args = argparse.Namespace(
        store=store, model="alibi-demo", version=None, threads=threads, seed=0, quick=quick,
        context_limit=context_limit(plan),
    )  # fmt: skip
    results = asyncio.run(run(args))
    results["checkpoint"] = checkpoint
    results["parity"] = parity
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = QUICK if args.quick else Plan()
    if getattr(args, "document", None):
        plan = dataclasses.replace(plan, document=args.document)
    settings = Settings(store=args.store, intra_op_threads=args.threads, warmup=True)
    model = load_model(ModelRepository(args.store), args.model, args.version, settings)
    if model.manifest.signature.generation_mode != "kv_cache":
        raise SystemExit(f"{args.model} is not a kv_cache decoder; this benchmark needs one")
    verified = model.manifest.max_context
    limit = args.context_limit or context_limit(plan)
    if limit > verified:
        if model.manifest.architecture != "alibi":
            raise SystemExit("--context-limit is for ALiBi models (no position table)")
        model.manifest = model.manifest.model_copy(update={"max_context": limit})
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
            "verified_max_context": verified,
        },
        "plan": plan.__dict__,
        "settings": {
            "intra_op_threads": args.threads,
            "prefix_cache_block_tokens": settings.prefix_cache_block_tokens,
            "prefix_cache_bytes": settings.prefix_cache_bytes,
        },
    }
    parts = [
        ("follow_ups", bench.follow_ups),
        ("shared", bench.shared),
        ("overhead", bench.overhead),
    ]
    wanted = getattr(args, "parts", None) or [name for name, _ in parts]
    for name, measure in tqdm(parts, desc="prefix-cache benchmark", unit="part"):
        if name in wanted:
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
    parser.add_argument("--quick", action="store_true", help="2,048-token document, fewer runs")
    parser.add_argument(
        "--context-limit", type=int, default=None,
        help="ALiBi only: serve up to this many tokens (default: what the plan needs)",
    )  # fmt: skip
    parser.add_argument("--document", type=int, default=None, help="document tokens (16384)")
    parser.add_argument(
        "--parts", type=lambda v: v.split(","), default=None,
        help="comma-separated subset of follow_ups,shared,overhead",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix_cache.json")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    print_tables(results)
    write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
