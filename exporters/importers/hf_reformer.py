"""HF ``transformers`` Reformer (``ReformerModelWithLMHead``) -> Longhaul Reformer, HF-compatible.

HF's Reformer mixes "local" and LSH layers, has learned or axial position tables, a head width
independent of d/h, concatenates the two reversible streams before a 2d-wide LayerNorm and head,
and may factorise its buckets (``num_buckets`` a list, e.g. [64, 128]). All of these are
ReformerConfig options; the LSH attention itself runs with ``hf_compatible=True`` (see
exporters/architectures/reformer.py for what that changes).

Hashing rotations. With ``hash_seed`` set, HF draws them from ``torch.manual_seed(hash_seed)``
on every call (the same rotations in every LSH layer); without it (the published checkpoints)
it draws new ones from the global generator on every call, so no two of its runs agree. Either
way the rotations are drawn here once, as HF draws them from a seed — the config's, else
``--hash-seed`` (default ``DEFAULT_HASH_SEED``) — and stored as each LSH layer's fixed rotation
buffer: the imported model equals HF run with that seed in its config, and is deterministic.
The seed is recorded in the checkpoint's (and so the manifest's) config, and where it came from
in ``imported_from``.

Refused: automatic ``num_buckets`` (HF sizes it from the first input's length), chunk look-ahead
or more than one chunk of look-back, and encoder (``is_decoder=False``) checkpoints.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from exporters.architectures.common import Activation
from exporters.architectures.reformer import ReformerConfig
from exporters.importers.source import (
    CONFIG_FILE,
    Converted,
    ImportOptions,
    WeightMap,
    load_weights,
    read_json,
    required,
    special_tokens,
    unsupported,
)

# HF activation names -> FeedForward activations.
ACTIVATIONS: dict[str, Activation] = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}
# The seed of the rotations when the config has none. Any seed gives a model of the same quality
# (tests/exporters/importers/test_hf_reformer.py measures the spread over HF's random draws).
DEFAULT_HASH_SEED = 0
# Options whose HF default is the only value Longhaul's chunked attention reproduces.
REQUIRED = {
    "is_decoder": True,
    "lsh_num_chunks_before": 1,
    "lsh_num_chunks_after": 0,
    "local_num_chunks_before": 1,
    "local_num_chunks_after": 0,
}


def _hf_value(config: dict[str, Any], name: str, default: Any) -> Any:
    value = config.get(name)
    return default if value is None else value


def hash_seed_of(config: dict[str, Any], option: int | None) -> tuple[int, str]:
    """The seed the rotations are drawn from, and where it came from."""
    seed = config.get("hash_seed")
    if seed is None:
        return (DEFAULT_HASH_SEED, "default") if option is None else (option, "--hash-seed")
    if option is not None and option != seed:
        raise unsupported(
            "hash_seed", seed, f"its own seed only: --hash-seed {option} would change the model"
        )
    return int(seed), "config"


def bucket_factors(config: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
    """num_buckets -> (n_buckets, bucket_factors): an integer, or a list of factors."""
    buckets = config.get("num_buckets")
    if isinstance(buckets, int) and not isinstance(buckets, bool):
        factors: tuple[int, ...] = (buckets,)
    elif isinstance(buckets, list | tuple) and buckets and all(isinstance(f, int) for f in buckets):
        factors = tuple(buckets)
    else:
        raise unsupported(
            "num_buckets", buckets, "an even integer or a list of even factors (not automatic)"
        )
    if any(f <= 0 or f % 2 for f in factors):
        raise unsupported("num_buckets", buckets, "even bucket counts only")
    return math.prod(factors), factors if len(factors) > 1 else ()


def config_from_hf(
    src: Path, config: dict[str, Any], hash_seed: int | None = None
) -> ReformerConfig:
    for option, expected in REQUIRED.items():
        if config.get(option, expected) != expected:
            raise unsupported(option, config[option], repr(expected))
    seed, _ = hash_seed_of(config, hash_seed)
    n_buckets, factors = bucket_factors(config)
    act = _hf_value(config, "hidden_act", "relu")
    if act not in ACTIVATIONS:
        raise unsupported("hidden_act", act, " / ".join(ACTIVATIONS))

    d_model, vocab_size = int(required(config, "hidden_size")), int(required(config, "vocab_size"))
    layers = tuple(_hf_value(config, "attn_layers", ["local", "lsh"] * 3))
    axial = bool(_hf_value(config, "axial_pos_embds", True))
    tokens = special_tokens(src, config, vocab_size)
    return ReformerConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_heads=int(required(config, "num_attention_heads")),
        n_layers=len(layers),
        d_ff=int(_hf_value(config, "feed_forward_size", 512)),
        chunk_length=int(_hf_value(config, "lsh_attn_chunk_length", 64)),
        n_buckets=n_buckets,
        bucket_factors=factors,
        n_hashes=int(_hf_value(config, "num_hashes", 1)),
        hash_seed=seed,
        causal=True,
        layer_norm_eps=float(_hf_value(config, "layer_norm_eps", 1e-12)),
        hf_compatible=True,
        attn_layers=layers,
        local_chunk_length=int(_hf_value(config, "local_attn_chunk_length", 64)),
        attn_head_dim=int(_hf_value(config, "attention_head_size", 64)),
        position_embedding="axial" if axial else "learned",
        max_position_embeddings=0
        if axial
        else int(_hf_value(config, "max_position_embeddings", 4096)),
        axial_pos_shape=tuple(_hf_value(config, "axial_pos_shape", [64, 64])) if axial else (),
        axial_pos_dims=tuple(_hf_value(config, "axial_pos_embds_dim", [64, 192])) if axial else (),
        activation=ACTIVATIONS[act],
        stream_merge="concat",
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
    )


def hf_rotations(config: ReformerConfig) -> Tensor:
    """(h, e, r, sum(factors) / 2): what HF's LSH layers draw after
    ``torch.manual_seed(hash_seed)``.

    A private generator with the same seed yields the same numbers as the reseeded global one,
    without touching the caller's random state.
    """
    shape = (config.n_heads, config.head_dim, config.n_hashes, sum(config.hash_factors) // 2)
    return torch.randn(shape, generator=torch.Generator().manual_seed(config.hash_seed))


def convert(src: Path, options: ImportOptions) -> Converted:
    hf = read_json(src / CONFIG_FILE)
    config = config_from_hf(src, hf, options.hash_seed)
    weights = WeightMap(load_weights(src), strip_prefix="reformer.")
    out: dict[str, Tensor] = {"embed.weight": weights.take("embeddings.word_embeddings.weight")}
    if config.position_embedding == "axial":
        # HF keeps the factors broadcast-ready, (n0, 1, d0) and (1, n1, d1).
        for axis in range(2):
            factor = weights.take(f"embeddings.position_embeddings.weights.{axis}")
            out[f"pos_axial.{axis}"] = factor.reshape(config.axial_pos_shape[axis], -1)
    else:
        out["pos_embed.weight"] = weights.take("embeddings.position_embeddings.embedding.weight")

    rotations = hf_rotations(config)
    projections = {
        "lsh": {"query_key": "qk", "value": "v"},
        "local": {"query": "q", "key": "k", "value": "v"},
    }
    for i, kind in enumerate(config.layer_kinds):
        theirs, ours = f"encoder.layers.{i}", f"blocks.{i}"
        for part in ("weight", "bias"):
            out[f"{ours}.attn.norm.{part}"] = weights.take(f"{theirs}.attention.layer_norm.{part}")
            out[f"{ours}.ff.norm.{part}"] = weights.take(f"{theirs}.feed_forward.layer_norm.{part}")
            out[f"{ours}.ff.ff.fc_in.{part}"] = weights.take(
                f"{theirs}.feed_forward.dense.dense.{part}"
            )
            out[f"{ours}.ff.ff.fc_out.{part}"] = weights.take(
                f"{theirs}.feed_forward.output.dense.{part}"
            )
        for hf_name, name in projections[kind].items():
            out[f"{ours}.attn.{name}.weight"] = weights.take(
                f"{theirs}.attention.self_attention.{hf_name}.weight"
            )
        out[f"{ours}.attn.out.weight"] = weights.take(f"{theirs}.attention.output.dense.weight")
        out[f"{ours}.attn.out.bias"] = torch.zeros(config.d_model)  # HF's has none
        if kind == "lsh":
            out[f"{ours}.attn.rotations"] = rotations.clone()
    for part in ("weight", "bias"):
        out[f"norm.{part}"] = weights.take(f"encoder.layer_norm.{part}")
    out["head.proj.weight"] = weights.take("lm_head.decoder.weight")
    out["head.proj.bias"] = torch.zeros(config.vocab_size)
    notes = _dropped_head_bias(weights)
    seed, source = hash_seed_of(hf, options.hash_seed)
    if source != "config":
        notes.append(
            f"{CONFIG_FILE} sets no hash_seed (transformers then draws new hashing rotations on "
            f"every call); the rotations are fixed once, drawn from seed {seed} ({source})"
        )
    weights.check_all_used()
    trained = _trained_context(config, hf, options.trained_context)
    provenance = {"hash_seed": seed, "hash_seed_from": source}
    return Converted(config, out, trained, tuple(notes), provenance)


def _dropped_head_bias(weights: WeightMap) -> list[str]:
    """transformers (pinned 5.23.0) builds the head as a bias-free Linear and never adds
    ``lm_head.bias`` (4.x tied it into the Linear). Longhaul reproduces the reference, so the
    bias is dropped; a non-zero one (a checkpoint trained under 4.x) is reported, not hidden."""
    notes = []
    for name in ("lm_head.bias", "lm_head.decoder.bias"):
        if name in weights and bool(weights.take(name).any()):
            notes.append(
                f"{name} is non-zero but transformers' ReformerModelWithLMHead does not add it to "
                "the logits; imported without it, as the reference computes"
            )
    return notes


def _trained_context(config: ReformerConfig, hf: dict[str, Any], override: int | None) -> int:
    """HF refuses inputs longer than max_position_embeddings, even when the table is larger."""
    if override:
        return override
    limit = int(_hf_value(hf, "max_position_embeddings", 4096))
    return min(limit, config.max_positions or limit)
