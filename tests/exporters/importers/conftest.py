"""Importer fixtures: tiny random reference models built with the reference libraries themselves,
saved the way their users save them, then imported (and exported) once per session.

The weights are re-drawn at the scale of a trained network (``trained_scale``): the libraries'
own initialisations (std 0.02, zero biases, unit norms) give near-zero logits on which almost
any mapping agrees, while O(1) activations make a wrong transpose, a missing bias or a swapped
norm show up as O(1) differences.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

from exporters.checkpoint import Checkpoint, load_checkpoint
from exporters.export import ExportRequest, export
from exporters.importers import import_checkpoint
from model_store import ModelRepository, ModelVersion

# Tokenizer training text: deterministic, and byte-level BPE covers any text the service sees.
TOKENIZER_TEXT = [
    "def forward(self, input_ids, attention_mask):\n    return self.head(hidden)\n",
    "The quick brown fox jumps over the lazy dog. Long context, efficient attention.\n",
    "for i in range(10):\n    print(i, i * i)\n",
] * 20
SPECIALS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: BLOOM's own layout (pad, bos, eos)
ALIBI_TRAINED_CONTEXT = 128  # keeps export's extrapolation sweep (up to 8x) quick
ALIBI_MAX_CONTEXT = 2048


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer)
    return tokenizer


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def trained_scale(model: ModuleT, seed: int) -> ModuleT:
    """Re-draw every parameter at a trained network's scale (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, mean: float, std: float) -> None:
        t.copy_(mean + std * torch.randn(t.shape, generator=gen))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                normal(module.weight, 0.0, module.in_features**-0.5)
                if module.bias is not None:
                    normal(module.bias, 0.0, 0.1)
            elif isinstance(module, nn.Embedding):
                normal(module.weight, 0.0, 1.0)
            elif isinstance(module, nn.LayerNorm):
                normal(module.weight, 1.0, 0.1)
                if module.bias is not None:
                    normal(module.bias, 0.0, 0.1)
        # Parameters outside those modules: Reformer's axial factors and head bias (non-zero, so
        # the test of its dropping is real), lucidrains' sequence projections.
        for name, param in model.named_parameters():
            if "position_embeddings.weights" in name or name.endswith(("proj_k", "proj_v")):
                normal(param, 0.0, param.shape[-1] ** -0.5)
            elif name == "lm_head.bias":
                normal(param, 0.0, 0.1)
    return model.eval()


@dataclass
class Imported:
    """A reference model, the directory it was saved to, and the Longhaul checkpoint from it."""

    name: str  # the import format, also the model's name in the test store
    reference: Any  # the reference library's model (transformers or linformer)
    src: Path
    out: Path
    tokenizer: Tokenizer

    @cached_property
    def checkpoint(self) -> Checkpoint:
        return load_checkpoint(self.out)


def save_hf(model: nn.Module, tokenizer: Tokenizer, src: Path) -> None:
    model.save_pretrained(src)
    tokenizer.save(str(src / "tokenizer.json"))


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer()


def _bloom(tokenizer: Tokenizer) -> nn.Module:
    from transformers import BloomConfig, BloomForCausalLM

    # Untied head: with random weights a tied one makes every token predict itself (its
    # embedding dominates the residual stream), and greedy decoding would repeat one token. MPT
    # below keeps the tied head, so both layouts are imported.
    config = BloomConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return trained_scale(BloomForCausalLM(config), seed=1)


def mpt_model(tokenizer: Tokenizer, **attn_config: object) -> nn.Module:
    from transformers import MptConfig, MptForCausalLM

    # 3 heads: not a power of two, so MPT's slope order differs from the paper's (the case the
    # "mpt" rule exists for), with a largest slope of 1/4 (6 heads would have 1/2: transformers
    # adds the bias as m·(j − 2047) and its own fp32 rounding of those values, ~1e-4 at 2048
    # tokens, would then fill the whole tolerance). clip_qkv clips some trained-scale values.
    config = MptConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=48, n_heads=3, n_layers=2,
        max_seq_len=ALIBI_MAX_CONTEXT, eos_token_id=2, pad_token_id=0,
        attn_config={"clip_qkv": 2.0, "alibi_bias_max": 8, **attn_config},
    )  # fmt: skip
    torch.manual_seed(0)
    return trained_scale(MptForCausalLM(config), seed=2)


def _import(
    kind: str, model: nn.Module, tokenizer: Tokenizer, root: Path, trained: int | None
) -> Imported:
    src, out = root / "src", root / "longhaul"
    save_hf(model, tokenizer, src)
    import_checkpoint(kind, src, out, trained_context=trained)
    return Imported(kind, model, src, out, tokenizer)


@pytest.fixture(scope="session")
def bloom(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Imported:
    root = tmp_path_factory.mktemp("hf-bloom")
    return _import("hf-bloom", _bloom(tokenizer), tokenizer, root, ALIBI_TRAINED_CONTEXT)


@pytest.fixture(scope="session")
def mpt(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Imported:
    root = tmp_path_factory.mktemp("hf-mpt")
    return _import("hf-mpt", mpt_model(tokenizer), tokenizer, root, ALIBI_TRAINED_CONTEXT)


# The HF Reformer under test: local and LSH layers with different chunk lengths (inputs pad to
# their lcm, 16), two hash rounds (rounds wrap into each other), a head width (12) that is not
# d/h, axial positions (16 x 32 = 512, the longest input the reference accepts).
REFORMER = {
    "hidden_size": 32, "num_attention_heads": 2, "attention_head_size": 12,
    "attn_layers": ["local", "lsh"], "feed_forward_size": 64, "hidden_act": "relu",
    "axial_pos_embds": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [8, 24],
    "max_position_embeddings": 512, "num_buckets": 4, "num_hashes": 2, "hash_seed": 7,
    "lsh_attn_chunk_length": 8, "local_attn_chunk_length": 16, "is_decoder": True,
    "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip


def reformer_model(tokenizer: Tokenizer, seed: int = 3, **overrides: object) -> nn.Module:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(vocab_size=tokenizer.get_vocab_size(), **{**REFORMER, **overrides})
    torch.manual_seed(0)
    return trained_scale(ReformerModelWithLMHead(config), seed=seed)


@pytest.fixture(scope="session")
def reformer(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Imported:
    root = tmp_path_factory.mktemp("hf-reformer")
    return _import("hf-reformer", reformer_model(tokenizer), tokenizer, root, None)


LINFORMER = {"dim": 32, "seq_len": 128, "depth": 2, "k": 16, "heads": 4}


def save_linformer(
    args: dict[str, object], tokenizer: Tokenizer, src: Path, seed: int
) -> nn.Module:
    """A LinformerLM saved as its users do: constructor arguments + torch.save(state_dict())."""
    from linformer import LinformerLM

    args = {"num_tokens": tokenizer.get_vocab_size(), **args}
    torch.manual_seed(0)
    model = trained_scale(LinformerLM(**args), seed=seed)
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps(args))
    torch.save(model.state_dict(), src / "model.pt")
    tokenizer.save(str(src.parent / "tokenizer.json"))  # the package ships none
    return model


@pytest.fixture(scope="session")
def linformer(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Imported:
    root = tmp_path_factory.mktemp("lucidrains-linformer")
    model = save_linformer(LINFORMER, tokenizer, root / "src", seed=5)
    out = root / "longhaul"
    import_checkpoint("lucidrains-linformer", root / "src", out, tokenizer=root / "tokenizer.json")
    return Imported("lucidrains-linformer", model, root / "src", out, tokenizer)


@pytest.fixture(scope="session")
def import_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("import-store")


@pytest.fixture(scope="session")
def exported(import_store: Path) -> Callable[[Imported], ModelVersion]:
    """Factory: imported -> the ONNX version published from it (named after the import format),
    exported once per session."""
    cache: dict[str, ModelVersion] = {}

    def get(imported: Imported) -> ModelVersion:
        name = imported.name
        if name not in cache:
            alibi = imported.checkpoint.architecture == "alibi"
            request = ExportRequest(
                checkpoint=imported.out,
                store=import_store,
                name=name,
                format="onnx",
                # ALiBi's measured max_context would stop short of the 2048 the tests check
                max_context=ALIBI_MAX_CONTEXT if alibi else None,
                progress=False,
            )
            cache[name] = export(request).published
            assert ModelRepository(import_store).verify(name, cache[name].version).ok
        return cache[name]

    return get


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids, mask) (b, t) int64, padded on the left as decoders are served."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def random_rows(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    gen = np.random.default_rng(seed)
    return [gen.integers(3, vocab, size=n).tolist() for n in lengths]
