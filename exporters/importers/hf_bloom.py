"""HF ``transformers`` BLOOM (``BloomForCausalLM``) -> Longhaul ALiBi decoder.

BLOOM is a pre-LayerNorm GPT with ALiBi (the paper's slopes), a LayerNorm right after the token
embedding, tanh-GELU, biases everywhere and an LM head tied to the embedding without a bias. Two
layout differences are mapped here: the fused QKV projection is laid out per head as
(h, [q, k, v], e) where Longhaul's is ([q, k, v], h, e), and the head gets a zero bias.
BLOOM's ALiBi adds m·j (key position) instead of −m·(i − j); per query row that is a constant
shift, which softmax ignores. ``slow_but_exact`` with ``pretraining_tp`` > 1 only splits the same
matmuls into slices (a difference of float rounding), so it is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from exporters.architectures.alibi import AlibiConfig
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

# BLOOM configs do not record their training length; the BigScience models used 2048.
BLOOM_TRAINED_CONTEXT = 2048


def config_from_hf(src: Path, config: dict[str, Any], trained_context: int | None) -> AlibiConfig:
    if config.get("apply_residual_connection_post_layernorm", False):
        raise unsupported(
            "apply_residual_connection_post_layernorm", True, "False (residual before the norm)"
        )
    d_model = int(required(config, "hidden_size", "n_embed"))
    vocab_size = int(required(config, "vocab_size"))
    tokens = special_tokens(src, config, vocab_size)
    return AlibiConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_heads=int(required(config, "n_head", "num_attention_heads")),
        n_layers=int(required(config, "n_layer", "num_hidden_layers")),
        d_ff=4 * d_model,  # BLOOM's MLP width is fixed at 4·d
        trained_context=trained_context or int(config.get("seq_length") or BLOOM_TRAINED_CONTEXT),
        layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        embed_layer_norm=True,
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
    )


def _qkv_to_longhaul(fused: Tensor, n_heads: int) -> Tensor:
    """Rows ordered (h, [q, k, v], e) -> ([q, k, v], h, e); works for the weight and the bias."""
    rest = fused.shape[1:]
    per_head = fused.reshape(n_heads, 3, -1, *rest)  # (h, 3, e, ...)
    return per_head.transpose(0, 1).reshape(fused.shape)  # (3 * h * e, ...)


def convert(src: Path, options: ImportOptions) -> Converted:
    trained_context = options.trained_context
    hf = read_json(src / CONFIG_FILE)
    config = config_from_hf(src, hf, trained_context)
    # BloomForCausalLM saves "transformer."-prefixed names; a bare BloomModel saves them unprefixed.
    weights = WeightMap(load_weights(src), strip_prefix="transformer.")
    out: dict[str, Tensor] = {"embed.weight": weights.take("word_embeddings.weight")}
    for part in ("weight", "bias"):
        out[f"embed_norm.{part}"] = weights.take(f"word_embeddings_layernorm.{part}")
        out[f"ln_f.{part}"] = weights.take(f"ln_f.{part}")
    renames = {
        "input_layernorm": "ln_attn",
        "self_attention.dense": "attn.out",
        "post_attention_layernorm": "ln_ff",
        "mlp.dense_h_to_4h": "ff.fc_in",
        "mlp.dense_4h_to_h": "ff.fc_out",
    }
    for i in range(config.n_layers):
        for theirs, ours in renames.items():
            for part in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{part}"] = weights.take(f"h.{i}.{theirs}.{part}")
        for part in ("weight", "bias"):
            fused = weights.take(f"h.{i}.self_attention.query_key_value.{part}")
            out[f"blocks.{i}.attn.qkv.{part}"] = _qkv_to_longhaul(fused, config.n_heads)
    # Tied head (the default) is saved once, as the embedding; an untied one has its own tensor.
    head = "lm_head.weight"
    out["head.proj.weight"] = weights.take(head) if head in weights else out["embed.weight"]
    out["head.proj.bias"] = torch.zeros(config.vocab_size)
    weights.check_all_used()
    return Converted(config, out, config.trained_context)
