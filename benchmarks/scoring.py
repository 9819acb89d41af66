"""Scoring throughput: ``echo`` + ``max_tokens: 0`` + ``logprobs`` on 4K-token texts.

What loglikelihood harnesses send: the prompt is run through the model (chunked prefill) and
every position's log-softmax is taken for the next prompt token, nothing is generated. Three
rows, side by side in one process on one model, so the ratios hold on a busy machine:

* ``prefill only``: the same prompts with ``max_new_tokens = 0`` and no scores (the floor: the
  forward passes alone);
* ``engine scoring``: ``prompt_logprobs = 1`` through the engine (``submit_many``), in process;
* ``http scoring``: ``POST /v1/completions`` with a list of token-id lists, ``echo``,
  ``logprobs: 1``, ``max_tokens: 0`` through the app (httpx ASGI transport, no socket): JSON of
  every token's logprob and top-1 included.

Texts: the Python standard library's sources (the demo model's training domain), tokenized with
the model's tokenizer and cut into windows of ``--length`` tokens. The ALiBi demo model's
``max_context`` (2,048) is lifted in memory to hold them, as the engine section does for long
contexts; the numbers are throughput, not the quality of scores past the trained length.

    python -m benchmarks.scoring --store models --model alibi-demo [--texts 8 --length 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from model_store import ModelRepository
from service.engine.generation import GenerationEngine
from service.engine.models import LoadedModel, load_model
from service.engine.sampling import SamplingParams
from service.metrics import Metrics
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Plan:
    texts: int = 8
    length: int = 4096
    repeats: int = 3  # rounds per row, interleaved; the median is reported


QUICK = Plan(texts=2, length=1024, repeats=1)


def corpus_windows(model: LoadedModel, texts: int, length: int) -> list[list[int]]:
    """``texts`` windows of ``length`` token ids from the standard library's sources."""
    import os

    root = Path(os.__file__).parent
    ids: list[int] = []
    for path in sorted(root.glob("*.py")):
        ids.extend(model.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")).ids)
        if len(ids) >= texts * length:
            break
    return [ids[i * length : (i + 1) * length] for i in range(texts)]


async def _engine_row(engine: GenerationEngine, prompts: list[list[int]], score: bool) -> float:
    params = SamplingParams(max_new_tokens=0, prompt_logprobs=1 if score else None)
    started = time.perf_counter()
    groups = await engine.submit_many(prompts, params)
    results = await asyncio.gather(*(g[0].collect() for g in groups))
    elapsed = time.perf_counter() - started
    if score:
        assert all(r.prompt and r.prompt.logprobs for r in results)
    return elapsed


async def _http_row(http: httpx.AsyncClient, model: str, prompts: list[list[int]]) -> float:
    body = {"model": model, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0}
    started = time.perf_counter()
    response = await http.post("/v1/completions", json=body, timeout=3600)
    data = response.json()
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"scoring request failed: {response.status_code} {data}")
    assert len(data["choices"]) == len(prompts)
    return elapsed


def lifted_store(store: Path, name: str, limit: int, workdir: Path) -> Path:
    """A scratch copy of ``name``'s newest version whose manifest allows ``limit`` tokens (the
    manifest is not among the checksummed files); the source store is only read."""
    version = ModelRepository(store).resolve(name)
    target = workdir / "store" / name / str(version.version)
    shutil.rmtree(target.parent, ignore_errors=True)
    shutil.copytree(version.path, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["max_context"] = max(int(manifest["max_context"]), limit)
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return workdir / "store"


async def measure(
    store: Path, name: str, plan: Plan, threads: int, workdir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    from service.app import create_app

    original = ModelRepository(store).resolve(name).manifest.max_context
    scratch = lifted_store(store, name, plan.length + 1, workdir)
    # Prefix caching off: scored prompts bypass it anyway, and with it on the prefill-only
    # rounds after the first found every prompt cached (0.44 s against 7.6 s uncached).
    settings = Settings(store=scratch, models=[name], intra_op_threads=threads, prefix_cache=False)
    model = load_model(ModelRepository(scratch), name, None, settings)
    prompts = corpus_windows(model, plan.texts, plan.length)
    tokens = sum(len(p) for p in prompts)
    engine = GenerationEngine(model, settings, Metrics())
    await engine.start()
    await engine.warmup()
    app = create_app(settings)
    rows: dict[str, list[float]] = {"prefill only": [], "engine scoring": [], "http scoring": []}
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
                while (await http.get("/health/ready")).status_code != 200:
                    await asyncio.sleep(0.05)
                for round_ in range(plan.repeats):
                    rows["prefill only"].append(await _engine_row(engine, prompts, False))
                    rows["engine scoring"].append(await _engine_row(engine, prompts, True))
                    rows["http scoring"].append(await _http_row(http, name, prompts))
                    log(
                        f"  round {round_ + 1}: "
                        + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in rows.items())
                    )
    finally:
        await engine.stop()
        model.close()
    floor = statistics.median(rows["prefill only"])
    table = []
    for row, seconds in rows.items():
        median = statistics.median(seconds)
        table.append(
            {
                "row": row,
                "seconds": seconds,
                "median_s": median,
                "tokens_per_s": tokens / median,
                "vs_prefill_only": median / floor,
            }
        )
    return {
        "model": name,
        "manifest_max_context": original,
        "plan": dataclasses.asdict(plan),
        "tokens": tokens,
        "prefill_chunk_tokens": settings.prefill_chunk_tokens,
        "threads": threads,
        "rows": table,
    }


def print_table(result: dict[str, Any], log: Callable[[str], None] = print) -> None:
    plan = result["plan"]
    log(
        f"\nscoring {plan['texts']} texts x {plan['length']} tokens on {result['model']} "
        f"(echo + max_tokens 0 + logprobs 1), median of {plan['repeats']}:"
    )
    for r in result["rows"]:
        log(
            f"  {r['row']:<15} {r['median_s']:7.2f} s  {r['tokens_per_s']:9,.0f} tokens/s  "
            f"{r['vs_prefill_only']:.2f}x prefill only"
        )


def section(
    quick: bool, threads: int, workdir: Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """``make bench``'s scoring section, on the demo store's ALiBi model (``make models``)."""
    store = ROOT / "models"
    if not (store / "alibi-demo").is_dir():
        return {"skipped": f"no alibi-demo in {store} (run make models)"}
    plan = QUICK if quick else Plan()
    result = asyncio.run(measure(store, "alibi-demo", plan, threads, workdir, log))
    print_table(result, log)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scoring",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default="alibi-demo")
    parser.add_argument("--texts", type=int, default=Plan.texts)
    parser.add_argument("--length", type=int, default=Plan.length)
    parser.add_argument("--repeats", type=int, default=Plan.repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks/results/scratch/scoring")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    plan = Plan(args.texts, args.length, args.repeats)
    result = asyncio.run(measure(args.store, args.model, plan, args.threads, args.workdir, print))
    print_table(result)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
