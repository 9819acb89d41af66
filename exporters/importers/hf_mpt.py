"""HF ``transformers`` MPT (``MptForCausalLM``) -> Longhaul ALiBi decoder.

MPT is a pre-LayerNorm GPT with no biases at all (linears and LayerNorms), exact GELU, an LM head
tied to the embedding, optional clamping of q/k/v (``clip_qkv``) and MosaicML's ALiBi variant:
slopes 2^(−i·8/n) for the next power of two n ≥ h, interleaved differently from the paper when
h is not a power of two. Its bias is m·(j − (s − 1)) over key slots, a per-row shift of
−m·(i − j), which softmax ignores. The fused Wqkv is laid out [q, k, v] like Longhaul's.

``transformers`` (pinned 5.23.0) builds the bias with the default 8 whatever
``attn_config.alibi_bias_max`` says (MosaicML's own code honours it; every released MPT uses 8).
Longhaul reproduces the reference and reports a checkpoint whose value differs.

Refused: options that change the function but that ``transformers``' MPT silently ignores, so
that no reference computes them: prefix-LM, QK-LayerNorm, sequence-id masking, multi-query
attention, logit scaling, biases (``no_bias: false``) and ``alibi: false``. The MLP width is
``expansion_ratio`` · d as in MosaicML's code (``transformers`` cannot load another ratio at all).
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

# attn_config options and the only value Longhaul reproduces: the defaults of MPT itself.
REQUIRED_ATTENTION = {
    "attn_type": "multihead_attention",
    "prefix_lm": False,
    "qk_ln": False,
    "attn_uses_sequence_id": False,
    "alibi": True,
}
REQUIRED_MODEL = {"no_bias": True, "logit_scale": None}
LAYER_NORMS = ("layernorm", "low_precision_layernorm")  # the same math in fp32
REFERENCE_BIAS_MAX = 8.0  # what transformers' MPT uses, whatever the config says


def bias_max_note(config: dict[str, Any]) -> str | None:
    value = (config.get("attn_config") or {}).get("alibi_bias_max", REFERENCE_BIAS_MAX)
    if float(value) == REFERENCE_BIAS_MAX:
        return None
    return (
        f"attn_config.alibi_bias_max={value} is not used by transformers' MPT, which computes "
        f"its ALiBi slopes with {REFERENCE_BIAS_MAX:g}; imported as the reference computes"
    )


def config_from_hf(src: Path, config: dict[str, Any], trained_context: int | None) -> AlibiConfig:
    attn = config.get("attn_config") or {}
    for option, expected in REQUIRED_ATTENTION.items():
        if attn.get(option, expected) != expected:
            raise unsupported(f"attn_config.{option}", attn[option], repr(expected))
    for option, expected in REQUIRED_MODEL.items():
        if config.get(option, expected) != expected:
            raise unsupported(option, config[option], repr(expected))
    norm = config.get("norm_type", "low_precision_layernorm")
    if norm not in LAYER_NORMS:
        raise unsupported("norm_type", norm, " or ".join(LAYER_NORMS))
    d_model, vocab_size = int(required(config, "d_model")), int(required(config, "vocab_size"))
    tokens = special_tokens(src, config, vocab_size)
    clip, scale = attn.get("clip_qkv"), attn.get("softmax_scale")
    return AlibiConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_heads=int(required(config, "n_heads")),
        n_layers=int(required(config, "n_layers")),
        d_ff=int(config.get("expansion_ratio", 4)) * d_model,
        trained_context=trained_context or int(config.get("max_seq_len", 2048)),
        layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        bias=False,
        activation="gelu",
        alibi_slope_rule="mpt",
        alibi_bias_max=REFERENCE_BIAS_MAX,
        clip_qkv=float(clip) if clip else None,  # MPT clips only when the value is truthy
        softmax_scale=None if scale is None else float(scale),
        eos_token_id=tokens.eos_token_id,
        pad_token_id=tokens.pad_token_id,
    )


def convert(src: Path, options: ImportOptions) -> Converted:
    trained_context = options.trained_context
    hf = read_json(src / CONFIG_FILE)
    config = config_from_hf(src, hf, trained_context)
    weights = WeightMap(load_weights(src), strip_prefix="transformer.")
    out: dict[str, Tensor] = {
        "embed.weight": weights.take("wte.weight"),
        "ln_f.weight": weights.take("norm_f.weight"),
    }
    renames = {
        "norm_1": "ln_attn",
        "attn.Wqkv": "attn.qkv",
        "attn.out_proj": "attn.out",
        "norm_2": "ln_ff",
        "ffn.up_proj": "ff.fc_in",
        "ffn.down_proj": "ff.fc_out",
    }
    for i in range(config.n_layers):
        for theirs, ours in renames.items():
            out[f"blocks.{i}.{ours}.weight"] = weights.take(f"blocks.{i}.{theirs}.weight")
    head = "lm_head.weight"
    out["head.proj.weight"] = weights.take(head) if head in weights else out["embed.weight"]
    out["head.proj.bias"] = torch.zeros(config.vocab_size)  # MPT's head has none
    weights.check_all_used()
    note = bias_max_note(hf)
    return Converted(config, out, config.trained_context, (note,) if note else ())
