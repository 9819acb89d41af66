"""The architecture options added for imported models: defaults leave Longhaul's own models as
they were, and the new pure functions agree with slow references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from exporters.architectures.alibi import AlibiConfig, AlibiLM
from exporters.architectures.linformer import LinformerConfig, LinformerEncoder
from exporters.architectures.lsh import hf_lsh_attention, local_attention
from exporters.architectures.reformer import ReformerConfig, ReformerModel

ALIBI = AlibiConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=1, d_ff=32, trained_context=8)
REFORMER = ReformerConfig(vocab_size=64, d_model=16, n_heads=2, n_layers=2, d_ff=32,
                          chunk_length=4, n_buckets=4)  # fmt: skip


def test_defaults_keep_the_state_dict_layout() -> None:
    """Checkpoints written before these options existed load into models built with defaults."""
    alibi = AlibiLM(ALIBI).state_dict()
    assert "embed_norm.weight" not in alibi and "blocks.0.ln_attn.bias" in alibi
    assert "blocks.0.attn.qkv.bias" in alibi and "ln_f.bias" in alibi
    reformer = ReformerModel(REFORMER).state_dict()
    assert not any(k.startswith(("pos_embed", "pos_axial")) for k in reformer)
    assert reformer["norm.weight"].shape == (16,) and reformer["head.proj.weight"].shape == (64, 16)
    linformer = LinformerEncoder(LinformerConfig(vocab_size=64, d_model=16, n_heads=2)).state_dict()
    assert "norm.weight" in linformer


@pytest.mark.parametrize("causal", [True, False])
def test_local_attention_equals_banded_full_attention(causal: bool) -> None:
    """Chunk c, look-back one chunk: query i sees keys j with chunk(j) in {chunk(i) - 1,
    chunk(i)} (and j <= i when causal), nothing else; padding keys are never seen."""
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 2, 12, 4, generator=g)  # (b, h, t, e) each
    key_mask = torch.ones(2, 12, dtype=torch.bool)
    key_mask[1, 9:] = False
    out = local_attention(q, k, v, key_mask, chunk_length=4, causal=causal, wrap=False)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    visible = (j // 4 >= i // 4 - 1) & (j // 4 <= i // 4) & key_mask[:, None, None, :]
    if causal:
        visible = visible & (j <= i)
    scores = (q @ k.transpose(-1, -2) / 2).masked_fill(~visible, float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    real = key_mask[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], expected[real], atol=1e-5, rtol=0)


def test_hf_lsh_of_one_chunk_is_plain_attention_with_a_self_mask() -> None:
    """A sequence that fits one chunk: HF attends plainly, every round alike, self last resort."""
    g = torch.Generator().manual_seed(2)
    qk, v = torch.randn(2, 1, 2, 8, 4, generator=g)
    buckets = torch.randint(0, 4, (1, 2, 3, 8), generator=g)  # 3 rounds: must not matter
    mask = torch.ones(1, 8, dtype=torch.bool)
    out = hf_lsh_attention(qk, v, buckets, mask, 8, causal=True)
    keys = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / 2
    scores = (qk @ keys.transpose(-1, -2)).masked_fill(torch.eye(8, dtype=torch.bool), -1e5)
    scores = scores.masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out, F.softmax(scores, dim=-1) @ v, atol=1e-5, rtol=0)
    # The first token sees only itself: weight 1 up to float rounding, not HF's round-combining
    # 0.998 (which applies only when rounds are really combined, in chunked attention).
    torch.testing.assert_close(out[..., 0, :], v[..., 0, :], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attn_layers": ("lsh",)}, "attn_layers names 1 layers"),
        ({"attn_layers": ("lsh", "global")}, "attn_layers entries"),
        ({"position_embedding": "axial", "axial_pos_shape": (4, 4), "axial_pos_dims": (8, 4)},
         "must sum to d_model"),
        ({"position_embedding": "learned"}, "max_position_embeddings"),
        ({"stream_merge": "sum"}, "stream_merge"),
        ({"eos_token_id": 64}, "eos_token_id"),
    ],
)  # fmt: skip
def test_reformer_config_names_what_is_wrong(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(REFORMER, **changes)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alibi_slope_rule": "bloom"}, "alibi_slope_rule"),
        ({"clip_qkv": 0.0}, "clip_qkv"),
        ({"activation": "swish"}, "activation"),
        ({"pad_token_id": -1}, "pad_token_id"),
    ],
)
def test_alibi_config_names_what_is_wrong(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(ALIBI, **changes)
