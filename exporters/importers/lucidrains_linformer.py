"""lucidrains/linformer ``LinformerLM`` -> Longhaul Linformer encoder.

The package saves no config, so the source directory holds two files written by its user:
``config.json`` with the ``LinformerLM(...)`` constructor arguments (``num_tokens``, ``dim``,
``seq_len``, ``depth`` and optionally ``k``, ``heads``, ``dim_head``, ``one_kv_head``,
``share_kv``, ``reversible``, ``dropout``) and the model's ``state_dict()``, as
``model.safetensors`` or ``torch.save``d to ``model.pt`` (read with ``weights_only=True``).

LinformerLM is Longhaul's Linformer up to layout: pre-LayerNorm blocks, exact GELU, no final
LayerNorm, bias-free q/k/v projections (mapped to zero biases) and sequence projections stored
transposed, (n_max, k). ``share_kv`` (one projection serves keys and values, one E serves both)
is Longhaul's "key-value" sharing. LinformerLM takes no attention mask; Longhaul's zeroing of
padded keys before the projection makes a padded row compute what LinformerLM computes on the
row alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from exporters.architectures.linformer import LinformerConfig
from exporters.importers.source import (
    CONFIG_FILE,
    Converted,
    ImportOptions,
    UnsupportedCheckpointError,
    WeightMap,
    load_weights,
    read_json,
    unsupported,
)

REQUIRED_ARGS = ("num_tokens", "dim", "seq_len", "depth")
# Optional constructor arguments and LinformerLM's defaults.
DEFAULTS: dict[str, Any] = {
    "k": 256,
    "heads": 8,
    "dim_head": None,
    "one_kv_head": False,
    "share_kv": False,
    "reversible": False,
    "dropout": 0.0,
}


def config_from_args(args: dict[str, Any]) -> LinformerConfig:
    unknown = sorted(set(args) - set(REQUIRED_ARGS) - set(DEFAULTS))
    if unknown:
        raise UnsupportedCheckpointError(
            f"{CONFIG_FILE}: {', '.join(unknown)} are not LinformerLM arguments"
        )
    missing = [name for name in REQUIRED_ARGS if name not in args]
    if missing:
        raise UnsupportedCheckpointError(f"{CONFIG_FILE} must set {', '.join(missing)}")
    a = {**DEFAULTS, **args}
    dim, heads = int(a["dim"]), int(a["heads"])
    if a["dim_head"] not in (None, dim // heads):
        raise unsupported("dim_head", a["dim_head"], f"dim // heads = {dim // heads}")
    if a["one_kv_head"]:
        raise unsupported("one_kv_head", True, "False (one key/value projection per head)")
    if a["reversible"]:
        raise unsupported("reversible", True, "False (plain residual blocks)")
    return LinformerConfig(
        vocab_size=int(a["num_tokens"]),
        d_model=dim,
        n_heads=heads,
        n_layers=int(a["depth"]),
        d_ff=4 * dim,  # LinformerLM's FeedForward always uses mult=4
        k=int(a["k"]),
        n_max=int(a["seq_len"]),
        sharing="key-value" if a["share_kv"] else "none",
        norm_eps=1e-5,  # nn.LayerNorm's default, which LinformerLM uses
        activation="gelu",
        final_norm=False,
    )


def convert(src: Path, options: ImportOptions) -> Converted:
    trained_context = options.trained_context
    config = config_from_args(read_json(src / CONFIG_FILE))
    weights = WeightMap(load_weights(src))
    out: dict[str, Tensor] = {
        "tok_emb.weight": weights.take("token_emb.weight"),
        "pos_emb.weight": weights.take("pos_emb.weight"),
        "lm_head.proj.weight": weights.take("to_logits.weight"),
        "lm_head.proj.bias": weights.take("to_logits.bias"),
    }
    share_kv = config.sharing == "key-value"
    for i in range(config.n_layers):
        attn, ff = f"linformer.net.layers.{i}.0", f"linformer.net.layers.{i}.1"
        ours = f"blocks.{i}"
        for part in ("weight", "bias"):
            out[f"{ours}.norm_attn.{part}"] = weights.take(f"{attn}.norm.{part}")
            out[f"{ours}.norm_ff.{part}"] = weights.take(f"{ff}.norm.{part}")
            out[f"{ours}.attn.out.{part}"] = weights.take(f"{attn}.fn.to_out.{part}")
            out[f"{ours}.ff.fc_in.{part}"] = weights.take(f"{ff}.fn.w1.{part}")
            out[f"{ours}.ff.fc_out.{part}"] = weights.take(f"{ff}.fn.w2.{part}")
        to_k = weights.take(f"{attn}.fn.to_k.weight")
        to_v = to_k if share_kv else weights.take(f"{attn}.fn.to_v.weight")
        out[f"{ours}.attn.qkv.weight"] = torch.cat(
            [weights.take(f"{attn}.fn.to_q.weight"), to_k, to_v]
        )
        out[f"{ours}.attn.qkv.bias"] = torch.zeros(3 * config.d_model)
        # Longhaul's layout: layer i owns matrices 2i (E) and 2i + 1 (F), or just i when shared.
        out[f"seq_proj.{i if share_kv else 2 * i}"] = weights.take(f"{attn}.fn.proj_k").T
        if not share_kv:
            out[f"seq_proj.{2 * i + 1}"] = weights.take(f"{attn}.fn.proj_v").T
    weights.check_all_used()
    return Converted(config, out, trained_context or config.n_max)
