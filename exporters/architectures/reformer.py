"""Reformer (Kitaev et al. 2020): LSH attention, reversible residual layers, chunked feed-forward.

The modules that own parameters; the attention math itself is in lsh.py (pure functions).
Shape legend (see common.py): b batch, t length (padded to a multiple of the chunk length),
h heads, e head width, d model width, v vocabulary, r hash rounds, n chunks, c chunk length.

LSH attention: queries and keys share one projection (keys are the L2-normalised queries). Every
round hashes the vectors into buckets with a FIXED random rotation (a seeded buffer, so the same
input always gives the same output), sorts positions by (bucket, position), cuts the sorted
sequence into chunks of c and lets each chunk attend to itself and the chunk before it (the
causal variant narrows that further so the future cannot leak, see ``lsh.lsh_attention``). The
r rounds are combined weighted by each round's softmax normaliser (logsumexp).

Padding never changes what a real token computes: padding keys are masked, padding positions are
hashed into an extra bucket that sorts after every real one (so real tokens are chunked the same
however much padding a row carries), chunk 0 does not wrap around to look at the last chunk, and
positions count real tokens only (left padding does not shift them). A row's output is therefore
independent of the length it was padded to in a batch.

Incremental decoding (causal native models, ``ReformerModel.supports_kv_cache``): the causal
rule makes a token's output a function of earlier tokens only, so ``forward_step`` reads each
layer's cached qk vectors and values (ALiBi's cache layout: one (qk, v) pair per layer) and
returns the new tokens' entries, and ``lsh.lsh_attention_cached`` applies the same rule to the
new tokens without sorting; it equals ``forward`` up to float rounding. Padding slots may sit
anywhere in the past (positions and bucket ranks count real tokens only); ``forward_cached``
returns the whole present cache.

HF-compatible mode (``hf_compatible=True``, for checkpoints imported from HF ``transformers``)
reproduces HF's ``ReformerModelWithLMHead`` instead (``lsh.hf_lsh_attention``), and so gives up
both properties above:

* chunk look-back wraps: HF concatenates the hash rounds into one sorted sequence, so the first
  chunk of round k looks back at the last chunk of round k − 1 (round 0 at the last round's);
* the causal LSH mask is by position only (any earlier key of the chunk or the previous chunk),
  so a later token, by moving chunk boundaries, can change an earlier token's output, and a row's
  output depends on how far it was padded (HF pads to a multiple of the chunk lengths too);
* keys are HF's ``x · rsqrt(mean(x²) + 1e-6) / √e``, scores are not scaled again, and rounds are
  combined with HF's ``exp(lse − logsumexp(lse))``, which rounds differently from a softmax.

Where HF attends plainly (no chunks, no hashing), because the input fits its shortest chunk
length or the padded sequence fits a layer's chunk, every real token here already sits in chunk
0 of every round, so the chunked computation is that same attention once the look-back block
(padding or repeated keys then) is masked and rounds are combined by softmax (``hf_plain``).
Positions still count real tokens, so for unpadded and right-padded inputs the outputs equal
HF's. Other HF pieces are ordinary options: "local" layers (``attn_layers``), learned or axial
position tables (``position_embedding``), a head width other than d/h (``attn_head_dim``), the
concatenated streams (``stream_merge``) and the feed-forward ``activation``.

Export: no ``.item()``, no branch on tensor values; the only Python branches are on config fields.
Checked: the dynamo ONNX export with dynamic batch and sequence axes, and ``torch.jit.trace``, run
at lengths other than the export length (not multiples of c, and 4096+) and match eager.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exporters.architectures.common import (
    SPECIAL_TOKENS,
    Activation,
    FeedForward,
    LayerCache,
    LMHead,
    StackedCacheMixin,
    init_weights,
    require_choice,
    require_positive,
    require_token_ids,
    sinusoidal_positions,
)
from exporters.architectures.lsh import (
    hf_lsh_attention,
    local_attention,
    lsh_attention,
    lsh_attention_cached,
    lsh_buckets,
)

AttentionKind = Literal["lsh", "local"]
PositionEmbedding = Literal["sinusoidal", "learned", "axial"]
StreamMerge = Literal["mean", "concat"]

# RMS of a sinusoidal encoding is 1/sqrt(2) per dimension; this brings it to 0.02 (init std).
SINUSOID_SCALE = 0.02 * 2**0.5


@dataclass(frozen=True)
class ReformerConfig:
    vocab_size: int = 1024  # tokens, the special tokens of common.py included
    d_model: int = 64  # width of each of the two reversible streams (and of `hidden`)
    n_heads: int = 4  # attention heads h; d_model must be divisible by it
    n_layers: int = 2  # reversible blocks (one attention + one feed-forward each)
    d_ff: int = 256  # feed-forward inner width
    chunk_length: int = 32  # LSH chunk length c; inputs are padded internally to a multiple
    n_buckets: int = 8  # hash buckets per round (even: half are the negated rotations)
    # Factorised hashing (HF's num_buckets as a list): () = one factor, n_buckets itself. Each
    # factor even, their product n_buckets; the rotations have sum(factors) / 2 columns.
    bucket_factors: tuple[int, ...] = ()
    n_hashes: int = 2  # hash rounds r; more rounds, fewer missed neighbours, r× the cost
    hash_seed: int = 0  # seeds the fixed rotations (layer i uses hash_seed + i)
    # Feed-forward applied over the sequence in pieces of this many tokens to cap the peak
    # (b, t, d_ff) activation in eager runs; 0 = one piece. The split is a Python loop whose trip
    # count depends on the length (dynamo freezes the sequence axis, a trace fails at other
    # lengths), so exporters must build the model with 0. The math is position-wise, so the same
    # state dict gives the same outputs either way.
    ff_chunk_size: int = 0
    causal: bool = True  # True: causal LM ("generate"); False: bidirectional encoder ("encode")
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon
    # The fields below let HF Reformer checkpoints run on this architecture unforked; their
    # defaults are Longhaul's own model (see the module docstring for hf_compatible).
    hf_compatible: bool = False  # HF's LSH rules: wrapped look-back, causal by position, HF keys
    attn_layers: tuple[AttentionKind, ...] = ()  # per layer "lsh" | "local"; () = all "lsh"
    local_chunk_length: int = 64  # chunk length of "local" layers (own + previous chunk)
    attn_head_dim: int = 0  # head width e; 0 = d_model // n_heads (HF's attention_head_size)
    position_embedding: PositionEmbedding = "sinusoidal"  # or a "learned" / "axial" table
    max_position_embeddings: int = 0  # rows of the "learned" table
    axial_pos_shape: tuple[
        int, ...
    ] = ()  # "axial": (n0, n1), position p -> row p // n1, col p % n1
    axial_pos_dims: tuple[int, ...] = ()  # "axial": widths (d0, d1) of the two factors, d0 + d1 = d
    activation: Activation = "gelu_tanh"  # feed-forward activation (HF default: "relu")
    stream_merge: StreamMerge = "mean"  # "concat": LayerNorm + head over both streams (2d, HF)
    eos_token_id: int | None = 1  # generation stops here; None = only at the length limit
    pad_token_id: int = 0  # fills padded slots (always masked, so any id works)

    def __post_init__(self) -> None:
        for name in (
            "vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "chunk_length", "n_buckets",
            "n_hashes",
        ):  # fmt: skip
            require_positive(name, getattr(self, name))
        if self.vocab_size < len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must hold the {len(SPECIAL_TOKENS)} special tokens, "
                f"got {self.vocab_size}"
            )
        if self.attn_head_dim < 0:
            raise ValueError(f"attn_head_dim must be >= 0 (0 = d/h), got {self.attn_head_dim}")
        if not self.attn_head_dim and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_buckets % 2:
            raise ValueError(f"n_buckets must be even, got {self.n_buckets}")
        object.__setattr__(self, "bucket_factors", tuple(self.bucket_factors))
        if self.bucket_factors and (
            any(f <= 0 or f % 2 for f in self.bucket_factors)
            or math.prod(self.bucket_factors) != self.n_buckets
        ):
            raise ValueError(
                f"bucket_factors {self.bucket_factors} must be positive even numbers whose "
                f"product is n_buckets ({self.n_buckets})"
            )
        if self.hash_seed < 0:
            raise ValueError(f"hash_seed must be non-negative, got {self.hash_seed}")
        if self.ff_chunk_size < 0:
            raise ValueError(
                f"ff_chunk_size must be >= 0 (0 = no chunking), got {self.ff_chunk_size}"
            )
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        # JSON gives lists; keep tuples so the frozen config stays hashable and compares equal.
        for name in ("attn_layers", "axial_pos_shape", "axial_pos_dims"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for kind in self.attn_layers:
            require_choice("attn_layers entries", kind, AttentionKind)
        if self.attn_layers and len(self.attn_layers) != self.n_layers:
            raise ValueError(
                f"attn_layers names {len(self.attn_layers)} layers, n_layers is {self.n_layers}"
            )
        require_positive("local_chunk_length", self.local_chunk_length)
        require_choice("position_embedding", self.position_embedding, PositionEmbedding)
        if self.position_embedding == "learned":
            require_positive("max_position_embeddings", self.max_position_embeddings)
        if self.position_embedding == "axial":
            if len(self.axial_pos_shape) != 2 or len(self.axial_pos_dims) != 2:
                raise ValueError(
                    "axial positions need axial_pos_shape and axial_pos_dims of two entries each, "
                    f"got {self.axial_pos_shape} and {self.axial_pos_dims}"
                )
            if min(*self.axial_pos_shape, *self.axial_pos_dims) <= 0:
                raise ValueError(
                    f"axial_pos_shape {self.axial_pos_shape} and axial_pos_dims "
                    f"{self.axial_pos_dims} must be positive"
                )
            if sum(self.axial_pos_dims) != self.d_model:
                raise ValueError(
                    f"axial_pos_dims {self.axial_pos_dims} must sum to d_model ({self.d_model})"
                )
        require_choice("activation", self.activation, Activation)
        require_choice("stream_merge", self.stream_merge, StreamMerge)
        require_token_ids(self.vocab_size, self.eos_token_id, self.pad_token_id)

    @property
    def task(self) -> str:
        return "generate" if self.causal else "encode"

    @property
    def max_positions(self) -> int | None:
        """Sinusoidal positions and chunked attention: no limit; a position table: its size."""
        if self.position_embedding == "learned":
            return self.max_position_embeddings
        if self.position_embedding == "axial":
            return self.axial_pos_shape[0] * self.axial_pos_shape[1]
        return None

    @property
    def hash_factors(self) -> tuple[int, ...]:
        """The factors ``lsh_buckets`` hashes with: (n_buckets,) unless factorised."""
        return self.bucket_factors or (self.n_buckets,)

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        """Width of the ``hidden`` output: both streams side by side when concatenated."""
        return 2 * self.d_model if self.stream_merge == "concat" else self.d_model

    @property
    def layer_kinds(self) -> tuple[AttentionKind, ...]:
        all_lsh: tuple[AttentionKind, ...] = tuple("lsh" for _ in range(self.n_layers))
        return self.attn_layers or all_lsh

    @property
    def chunk_lengths(self) -> set[int]:
        """The chunk lengths of the layers in use (LSH, local or both)."""
        return {
            self.chunk_length if kind == "lsh" else self.local_chunk_length
            for kind in self.layer_kinds
        }

    @property
    def pad_multiple(self) -> int:
        """Inputs are padded to a multiple of every chunk length in use (HF pads the same)."""
        return math.lcm(*self.chunk_lengths)


class LSHSelfAttention(nn.Module):
    """F of the reversible block: LayerNorm -> shared-QK LSH attention -> output projection."""

    rotations: Tensor  # a registered buffer (nn.Module.__getattr__ is typed Tensor | Module)

    def __init__(self, config: ReformerConfig, layer: int) -> None:
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.qk = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model)
        # Fixed rotations, saved with the weights: hashing is part of the model, not noise. A loaded
        # checkpoint's rotations win over the ones drawn here.
        generator = torch.Generator().manual_seed(config.hash_seed + layer)
        shape = (config.n_heads, config.head_dim, config.n_hashes, sum(config.hash_factors) // 2)
        self.register_buffer("rotations", torch.randn(shape, generator=generator))

    def forward(self, x: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None) -> Tensor:
        """x (b, t, d), key_mask (b, t) bool, t a multiple of chunk_length -> (b, t, d)."""
        c = self.config
        x = self.norm(x)
        # unflatten, not view(b, t, ...), so no batch/length size is baked into a trace.
        qk = self.qk(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        v = self.v(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        buckets = lsh_buckets(qk, self.rotations, c.hash_factors)  # (b, h, r, t)
        buckets = buckets.masked_fill(~key_mask[:, None, None, :], c.n_buckets)  # pads last
        if c.hf_compatible:
            y = hf_lsh_attention(qk, v, buckets, key_mask, c.chunk_length, c.causal, hf_plain)
        else:
            y = lsh_attention(qk, v, buckets, key_mask, c.chunk_length, c.causal)
        return self.out(y.transpose(1, 2).flatten(2))  # (b, h, t, e) -> (b, t, d)

    def forward_step(self, x: Tensor, key_mask: Tensor, past: LayerCache) -> tuple[Tensor, Tensor]:
        """Causal native models only: x (b, t, d) new tokens, key_mask (b, s) bool over the
        cached + new tokens (padding anywhere in the past), past (qk, v), each (b, h, s − t, e),
        of the cached slots -> (b, t, d), new (2, b, h, t, e): [qk, v] of the new tokens.
        Buckets are recomputed from the cached qk (the rotations are fixed), so qk and v are all
        a layer needs to keep. The caches are concatenated here: the bucket ranks read every
        key anyway, so a token costs O(s) either way."""
        c = self.config
        x = self.norm(x)
        qk = self.qk(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        v = self.v(x).unflatten(-1, (c.n_heads, c.head_dim)).transpose(1, 2)  # (b, h, t, e)
        qk_all = torch.cat([past[0], qk], dim=2)  # (b, h, s, e)
        v_all = torch.cat([past[1], v], dim=2)  # (b, h, s, e)
        buckets = lsh_buckets(qk_all, self.rotations, c.hash_factors)  # (b, h, r, s)
        buckets = buckets.masked_fill(~key_mask[:, None, None, :], c.n_buckets)
        y = lsh_attention_cached(qk, qk_all, v_all, buckets, key_mask, c.chunk_length, c.n_buckets)
        return self.out(y.transpose(1, 2).flatten(2)), torch.stack([qk, v])


class LocalSelfAttention(nn.Module):
    """F of a "local" reversible block: LayerNorm -> chunked attention by position -> projection.

    Unlike LSH attention, queries and keys have separate projections (HF's LocalSelfAttention).
    """

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        inner = config.n_heads * config.head_dim
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.out = nn.Linear(inner, config.d_model)

    def forward(self, x: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None) -> Tensor:
        """x (b, t, d), key_mask (b, t) bool, t a multiple of local_chunk_length -> (b, t, d)."""
        c = self.config
        x = self.norm(x)
        heads = (c.n_heads, c.head_dim)
        q = self.q(x).unflatten(-1, heads).transpose(1, 2)  # (b, h, t, e)
        k = self.k(x).unflatten(-1, heads).transpose(1, 2)  # (b, h, t, e)
        v = self.v(x).unflatten(-1, heads).transpose(1, 2)  # (b, h, t, e)
        y = local_attention(
            q, k, v, key_mask, c.local_chunk_length, c.causal, c.hf_compatible, hf_plain
        )
        return self.out(y.transpose(1, 2).flatten(2))  # (b, h, t, e) -> (b, t, d)


class ChunkedFeedForward(nn.Module):
    """G of the reversible block: LayerNorm -> FeedForward, optionally in sequence chunks."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.chunk_size = config.ff_chunk_size
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ff = FeedForward(config.d_model, config.d_ff, config.activation)

    def forward(self, x: Tensor) -> Tensor:
        """(b, t, d) -> (b, t, d)."""
        x = self.norm(x)
        if self.chunk_size == 0:  # config switch, not a tensor value: export-safe
            return self.ff(x)
        return torch.cat([self.ff(piece) for piece in x.split(self.chunk_size, dim=1)], dim=1)


class ReversibleBlock(nn.Module):
    """RevNet block as in Reformer: y1 = x1 + F(x2), y2 = x2 + G(y1).

    The inputs can be recomputed from the outputs (``inverse``), which is what lets Reformer
    train without storing activations. Training here uses ordinary autograd (activations are
    kept); only the forward math is the reversible formulation, so ``inverse`` is exact.
    """

    def __init__(self, config: ReformerConfig, layer: int) -> None:
        super().__init__()
        self.attn: nn.Module = (
            LocalSelfAttention(config)
            if config.layer_kinds[layer] == "local"
            else LSHSelfAttention(config, layer)
        )
        self.ff = ChunkedFeedForward(config)

    def forward(
        self, x1: Tensor, x2: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """x1, x2 (b, t, d), key_mask (b, t) bool -> y1, y2 (b, t, d). ``hf_plain``: see
        :func:`lsh_attention` (hf_compatible models only)."""
        y1 = x1 + self.attn(x2, key_mask, hf_plain)
        y2 = x2 + self.ff(y1)
        return y1, y2

    def forward_step(
        self, x1: Tensor, x2: Tensor, key_mask: Tensor, past: LayerCache
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``forward`` for t new tokens (LSH layers of causal native models): x1, x2 (b, t, d),
        key_mask (b, s) bool, past (qk, v) each (b, h, s − t, e) -> y1, y2 (b, t, d), the new
        tokens' entries (2, b, h, t, e). F reads only x2, which for a new token depends on
        nothing but its own streams, so caching F's qk and v of every earlier token is enough."""
        a, new = self.attn.forward_step(x2, key_mask, past)  # type: ignore[operator]
        y1 = x1 + a
        y2 = x2 + self.ff(y1)
        return y1, y2, new

    def inverse(
        self, y1: Tensor, y2: Tensor, key_mask: Tensor, hf_plain: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """y1, y2 (b, t, d), key_mask (b, t) bool -> the inputs x1, x2 of ``forward``."""
        x2 = y2 - self.ff(y1)
        x1 = y1 - self.attn(x2, key_mask, hf_plain)
        return x1, x2


class ReformerModel(StackedCacheMixin, nn.Module):
    """Embeddings duplicated into the two streams (x1 = x2), reversible blocks, then the MEAN of
    the two streams (the paper concatenates to 2d; the mean keeps ``hidden`` at d_model as the
    model contract requires; ``stream_merge="concat"`` concatenates, as HF does), LayerNorm and
    the LM head."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        # Position tables only exist when configured, so sinusoidal models keep their key set.
        if config.position_embedding == "learned":
            self.pos_embed = nn.Embedding(config.max_position_embeddings, config.d_model)
        elif config.position_embedding == "axial":
            self.pos_axial = nn.ParameterList(
                nn.Parameter(torch.randn(n, dim))
                for n, dim in zip(config.axial_pos_shape, config.axial_pos_dims, strict=True)
            )
        self.blocks = nn.ModuleList(ReversibleBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = LMHead(config.hidden_size, config.vocab_size)
        init_weights(self)

    def _positions(self, positions: Tensor, t: int) -> Tensor:
        """(b, t) int64 positions -> (b, t, d) position embeddings, in the embedding dtype."""
        c = self.config
        dtype = self.embed.weight.dtype
        if c.position_embedding == "learned":
            return self.pos_embed(positions)
        if c.position_embedding == "axial":
            # The table is the outer "sum" of a row and a column factor: position p takes row
            # p // n1 of the first factor beside column p % n1 of the second. Gathering per
            # position avoids materialising all n0·n1 rows.
            cols = c.axial_pos_shape[1]
            row = torch.div(positions, cols, rounding_mode="floor")
            rows, cols_table = self.pos_axial
            return torch.cat([rows[row], cols_table[positions - row * cols]], dim=-1)
        # Scaled to the RMS of the N(0, 0.02) token embeddings: unscaled (RMS 0.7 per dim) the
        # position drowned the token 35:1 and the demo LM never got past the unigram loss.
        table = sinusoidal_positions(t, c.d_model, positions.device) * SINUSOID_SCALE
        return table.to(dtype)[positions]

    def _embed(self, input_ids: Tensor, attention_mask: Tensor, past: int | None = None) -> Tensor:
        """Token + position embeddings of the t new tokens -> (b, t, d). attention_mask (b, s)
        covers the ``past`` cached slots (None: there are none) and the new tokens."""
        total = attention_mask.shape[1]
        limit = self.config.max_positions
        # Reads only a shape (export-safe); a table model cannot embed positions past its size.
        if limit is not None and total > limit:
            raise ValueError(
                f"input length {total} exceeds this Reformer's position table ({limit})"
            )
        # Positions count real tokens only, so left padding (decoders) and free cache slots do
        # not shift them; pads get a repeated position but are masked as keys, outputs unused.
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (b, s)
        if past is not None:
            positions = positions[:, past:]  # (b, t)
        return self.embed(input_ids) + self._positions(positions, total)  # (b, t, d)

    def _merge_streams(self, x1: Tensor, x2: Tensor) -> Tensor:
        """(b, t, d) twice -> (b, t, hidden_size), normalised."""
        if self.config.stream_merge == "concat":
            return self.norm(torch.cat([x1, x2], dim=-1))
        return self.norm((x1 + x2) / 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask (b, t) int64 -> logits (b, t, v), hidden (b, t, hidden_size)
        (d_model, or 2·d_model for concatenated streams)."""
        t = input_ids.shape[1]
        x = self._embed(input_ids, attention_mask)  # (b, t, d)
        # Pad to a multiple of c. c is a Python constant, so (-t) % c is shape arithmetic that
        # both the dynamo exporter and the tracer keep symbolic (a symbolic divisor would not be).
        c = self.config.pad_multiple
        pad = (-t) % c
        x = F.pad(x, (0, 0, 0, pad))  # (b, t + pad, d)
        key_mask = F.pad(attention_mask, (0, pad)).bool()  # (b, t + pad)

        # HF pads nothing and attends plainly when the input fits its shortest chunk (a tensor
        # from the shape, so exported graphs decide it per call; unused unless hf_compatible).
        hf_plain = torch.arange(t, device=input_ids.device)[-1] < min(self.config.chunk_lengths)

        x1, x2 = x, x
        for block in self.blocks:
            x1, x2 = block(x1, x2, key_mask, hf_plain)
        hidden = self._merge_streams(x1, x2)[:, :t]  # (b, t, hidden_size)
        return self.head(hidden), hidden

    # --- incremental decoding (causal native models): the ALiBi cache convention

    @staticmethod
    def supports_kv_cache(config: ReformerConfig) -> bool:
        """Causal, native LSH rule, LSH layers only. Only then is a token's output a function of
        earlier tokens alone (module docstring), so a cache can reproduce the full forward.
        hf_compatible chunking lets later tokens move earlier ones' chunks; "local" layers chunk
        by padded slot, which left padding shifts."""
        return (
            config.causal
            and not config.hf_compatible
            and all(kind == "lsh" for kind in config.layer_kinds)
        )

    def _require_kv_cache(self) -> None:
        c = self.config
        if not self.supports_kv_cache(c):
            raise ValueError(
                "Reformer forward_cached needs a causal model with the native LSH rule and LSH "
                f"layers only (got causal={c.causal}, hf_compatible={c.hf_compatible}, "
                f"attn_layers={c.layer_kinds}); run forward() on the whole sequence instead"
            )

    def empty_cache(self, batch_size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        self._require_kv_cache()  # a clear error rather than a cache no forward_step accepts
        return super().empty_cache(batch_size, dtype, device)

    def forward_step(
        self, input_ids: Tensor, attention_mask: Tensor, past_key_values: Sequence[LayerCache]
    ) -> tuple[Tensor, Tensor]:
        """One prefill, chunk or decode step, equal to ``forward`` on the whole sequence up to
        float rounding (docs/decisions.md, "Reformer incremental decoding"), returning only the
        new tokens' cache entries (what the ``kv_cache`` graph exports).

        input_ids (b, t) int64; attention_mask (b, s + t) int64 over the cached and the new
        tokens, 0 at padding slots, which may sit anywhere in the past (real tokens, free slots,
        then the new token: positions and bucket ranks count real tokens only, and padded keys
        are never visible); past_key_values one (qk, v) pair per layer, each (b, h, s, e), s may
        be 0: the qk vectors (before normalisation) and the values of each LSH layer. Returns logits
        (b, t, v) and new_key_values (L, 2, b, h, t, e). No padding to a chunk multiple: the
        masks of :func:`lsh_attention_cached` replace the chunks.
        """
        self._require_kv_cache()
        x = self._embed(input_ids, attention_mask, past_key_values[0][0].shape[-2])  # (b, t, d)
        key_mask = attention_mask.bool()  # (b, s + t)
        x1, x2 = x, x
        news = []
        for layer, block in enumerate(self.blocks):
            # nn.ModuleList yields nn.Module, whose attributes are typed Tensor | Module.
            x1, x2, new = block.forward_step(x1, x2, key_mask, past_key_values[layer])  # type: ignore[operator]
            news.append(new)
        return self.head(self._merge_streams(x1, x2)), torch.stack(news)
