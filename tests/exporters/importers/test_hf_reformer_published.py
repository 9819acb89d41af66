"""The two published HF Reformer checkpoints' configurations, exactly as published, built with
``transformers``' own classes (random weights at a trained scale), saved as their users save
them (``save_pretrained``; crime-and-punishment's sentencepiece ``spiece.model``, enwik8 with no
tokenizer file at all), imported with default options and compared with the reference.

HF's own configs leave ``hash_seed`` unset: the reference then draws new rotations on every call.
The import fixes them from a seed (``DEFAULT_HASH_SEED`` unless ``--hash-seed``), so the imported
model equals the reference loaded with that seed in its config, and its loss on text lies within
the spread of the reference's own random-rotation losses.
"""

from __future__ import annotations

import json
import shutil
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from tokenizers import Tokenizer
from torch import nn

from exporters.checkpoint import load_checkpoint
from exporters.cli import main
from exporters.export import ExportRequest, export
from exporters.importers import import_checkpoint
from exporters.importers.hf_reformer import DEFAULT_HASH_SEED, config_from_hf
from exporters.importers.source import UnsupportedCheckpointError
from exporters.runtime import OnnxRunner
from exporters.tokenizer import byte_tokenizer
from service.app import create_app
from tests.exporters.importers.conftest import random_rows, trained_scale
from tests.service.conftest import make_settings, wait_ready

TOLERANCE = 1e-4
# google/reformer-crime-and-punishment's config.json (the fields transformers reads).
CRIME_AND_PUNISHMENT: dict[str, Any] = {
    "architectures": ["ReformerModelWithLMHead"], "model_type": "reformer",
    "attention_head_size": 64, "attn_layers": ["local", "lsh", "local", "lsh", "local", "lsh"],
    "axial_norm_std": 1.0, "axial_pos_embds": True, "axial_pos_embds_dim": [64, 192],
    "axial_pos_shape": [512, 1024], "chunk_size_feed_forward": 0, "chunk_size_lm_head": 0,
    "eos_token_id": 2, "feed_forward_size": 512, "hash_seed": None, "hidden_act": "relu",
    "hidden_dropout_prob": 0.05, "hidden_size": 256, "initializer_range": 0.02,
    "is_decoder": True, "layer_norm_eps": 1e-12, "local_attention_probs_dropout_prob": 0.05,
    "local_attn_chunk_length": 64, "local_num_chunks_after": 0, "local_num_chunks_before": 1,
    "lsh_attention_probs_dropout_prob": 0.0, "lsh_attn_chunk_length": 64,
    "lsh_num_chunks_after": 0, "lsh_num_chunks_before": 1, "max_position_embeddings": 524288,
    "num_attention_heads": 2, "num_buckets": [64, 128], "num_chunk_length": 64, "num_hashes": 1,
    "pad_token_id": 0, "tie_word_embeddings": False, "vocab_size": 320,
}  # fmt: skip
# google/reformer-enwik8's: 258 ids = 256 bytes + 2, and no tokenizer file.
ENWIK8: dict[str, Any] = {
    "architectures": ["ReformerModelWithLMHead"], "model_type": "reformer",
    "attention_head_size": 128,
    "attn_layers": ["local", "local", "lsh", "local", "local", "local", "lsh", "local", "local",
                    "local", "lsh", "local"],
    "axial_pos_embds": True, "axial_pos_embds_dim": [256, 768], "axial_pos_shape": [128, 512],
    "eos_token_id": 2, "feed_forward_size": 4096, "hash_seed": None, "hidden_act": "relu",
    "hidden_size": 1024, "is_decoder": True, "layer_norm_eps": 1e-12,
    "local_attn_chunk_length": 128, "local_num_chunks_after": 0, "local_num_chunks_before": 1,
    "lsh_attn_chunk_length": 256, "lsh_num_chunks_after": 0, "lsh_num_chunks_before": 1,
    "max_position_embeddings": 65536, "num_attention_heads": 8, "num_buckets": 512,
    "num_hashes": 4, "pad_token_id": 0, "tie_word_embeddings": False, "vocab_size": 258,
}  # fmt: skip
# enwik8's scheme at a width a test builds in seconds (the published one has 150 M parameters):
# the same vocabulary, hashing (integer buckets, 4 rounds, no seed) and layer pattern.
ENWIK8_SMALL = {
    **ENWIK8, "attention_head_size": 16, "hidden_size": 32, "num_attention_heads": 2,
    "feed_forward_size": 64, "axial_pos_embds_dim": [8, 24], "axial_pos_shape": [16, 32],
    "max_position_embeddings": 512, "attn_layers": ["local", "lsh", "local", "lsh"],
    "local_attn_chunk_length": 16, "lsh_attn_chunk_length": 32, "num_buckets": 8,
}  # fmt: skip


def _text(limit: int) -> str:
    """Deterministic English-and-code text of the Python standard library's own docs."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    names = ("textwrap.py", "argparse.py", "difflib.py", "inspect.py")
    return "".join((lib / name).read_text() for name in names)[:limit]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320-piece sentencepiece BPE model trained here (crime-and-punishment's vocabulary size
    and ids: pad 0, unk 1, eos 2), by the sentencepiece library itself."""
    import sentencepiece

    path = tmp_path_factory.mktemp("spiece") / "spiece"
    lines = [line for line in _text(60_000).splitlines() if line.strip()]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path), vocab_size=320, model_type="bpe",
        pad_id=0, unk_id=1, eos_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    return path.with_suffix(".model")


def reference(config: dict[str, Any], seed: int) -> nn.Module:
    from transformers import ReformerConfig, ReformerModelWithLMHead

    torch.manual_seed(0)
    return trained_scale(ReformerModelWithLMHead(ReformerConfig(**config)), seed=seed)


def seeded(src: Path, hash_seed: int) -> nn.Module:
    """The saved reference with ``hash_seed`` written into its config."""
    from transformers import ReformerModelWithLMHead

    return ReformerModelWithLMHead.from_pretrained(src, hash_seed=hash_seed).eval()


@pytest.fixture(scope="module")
def crime(tmp_path_factory: pytest.TempPathFactory, spiece: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("crime-and-punishment")
    model = reference(CRIME_AND_PUNISHMENT, seed=11)
    model.save_pretrained(root / "src")
    shutil.copy(spiece, root / "src" / "spiece.model")  # and no tokenizer.json
    result = import_checkpoint("hf-reformer", root / "src", root / "out")
    return {"root": root, "src": root / "src", "out": root / "out", "result": result}


def logits_diff(ref: nn.Module, model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        got, _ = model(ids, torch.ones_like(ids))
    assert expected.std() > 0.5  # logits of O(1): a wrong mapping would show
    return float((got - expected).abs().max())


def test_crime_and_punishment_imports_with_default_options(crime: dict[str, Any]) -> None:
    ckpt = load_checkpoint(crime["out"])
    c = ckpt.config
    assert (c.n_buckets, c.bucket_factors, c.hash_seed) == (8192, (64, 128), DEFAULT_HASH_SEED)
    assert (c.max_positions, ckpt.trained_context) == (524288, 524288)
    assert c.attn_layers == ("local", "lsh") * 3 and (c.d_model, c.n_heads) == (256, 2)
    assert sum(p.numel() for p in ckpt.model.parameters()) == pytest.approx(2.7e6, rel=0.05)
    # one column per factor half: 32 + 64, as HF draws them
    assert ckpt.model.blocks[1].attn.rotations.shape == (2, 64, 1, 96)
    provenance = ckpt.extra["imported_from"]
    assert provenance["hash_seed"] == DEFAULT_HASH_SEED
    assert provenance["hash_seed_from"] == "default" and provenance["tokenizer"] == "sentencepiece"
    notes = " ".join(crime["result"].notes)
    assert "no hash_seed" in notes and "spiece.model converted" in notes


@pytest.mark.parametrize("length", [5, 64, 100, 1024, 4096])
def test_crime_and_punishment_equals_transformers_with_the_seed(
    crime: dict[str, Any], length: int
) -> None:
    """Factorised buckets (64 x 128) and the fixed rotations, against the reference run with
    hash_seed = the imported seed: 5 and 64 fit a chunk (HF attends plainly), 100 pads."""
    ids = torch.tensor(random_rows(320, [length], seed=length))
    model = load_checkpoint(crime["out"]).model
    diff = logits_diff(seeded(crime["src"], DEFAULT_HASH_SEED), model, ids)
    assert diff <= TOLERANCE, f"length {length}: max|diff| {diff:.2e}"


def test_a_chosen_hash_seed_equals_the_reference_with_it(
    crime: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "seed5"
    assert main(["import", "hf-reformer", str(crime["src"]), "--out", str(out),
                 "--hash-seed", "5"]) == 0  # fmt: skip
    model = load_checkpoint(out).model
    ids = torch.tensor(random_rows(320, [300], seed=3))
    assert logits_diff(seeded(crime["src"], 5), model, ids) <= TOLERANCE
    # ... and not the default seed's function: the rotations matter at this length
    assert logits_diff(seeded(crime["src"], DEFAULT_HASH_SEED), model, ids) > 1e-2


def test_a_config_seed_is_kept_and_a_conflicting_one_refused(tmp_path: Path) -> None:
    config = {**CRIME_AND_PUNISHMENT, "hash_seed": 7}
    assert config_from_hf(tmp_path, config).hash_seed == 7
    assert config_from_hf(tmp_path, config, hash_seed=7).hash_seed == 7
    with pytest.raises(UnsupportedCheckpointError, match="hash_seed"):
        config_from_hf(tmp_path, config, hash_seed=8)


def test_fixed_rotations_lie_within_the_references_random_spread(
    crime: dict[str, Any], record_property: Any
) -> None:
    """On held-out text, HF without a seed gives a different loss on every call; the imported
    model's one fixed draw is one more sample of the same distribution."""
    from transformers import ReformerModelWithLMHead

    tokenizer = load_checkpoint(crime["out"]).tokenizer
    ids = torch.tensor([tokenizer.encode(_text(200_000)[120_000:140_000]).ids[:2048]])
    unseeded = ReformerModelWithLMHead.from_pretrained(crime["src"]).eval()
    assert unseeded.config.hash_seed is None
    torch.manual_seed(1234)  # the reference's draws, reproducible for this test
    with torch.no_grad():
        theirs = [float(unseeded(input_ids=ids, labels=ids).loss) for _ in range(20)]
        model = load_checkpoint(crime["out"]).model
        logits, _ = model(ids, torch.ones_like(ids))
        ours = float(nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))
        again, _ = model(ids, torch.ones_like(ids))
    assert torch.equal(logits, again)  # deterministic from now on
    spread = max(theirs) - min(theirs)
    figures = (
        f"N=20 reference losses: min {min(theirs):.4f} max {max(theirs):.4f} mean "
        f"{np.mean(theirs):.4f} std {np.std(theirs):.4f}; Longhaul {ours:.4f}, "
        f"{sum(t < ours for t in theirs)} of 20 below it"
    )
    record_property("rotation_spread", figures)
    assert spread > 1e-3, figures  # the reference really draws new rotations per call
    assert min(theirs) <= ours <= max(theirs), figures


def test_sentencepiece_ids_are_sentencepieces(crime: dict[str, Any], spiece: Path) -> None:
    import sentencepiece
    from transformers import AutoTokenizer

    text = _text(200_000)[150_000:154_000] + "  Ünïcödé, 罪と罰, tabs\tand  trailing  "
    expected = sentencepiece.SentencePieceProcessor(model_file=str(spiece)).encode(text)
    tokenizer = Tokenizer.from_file(str(crime["out"] / "tokenizer.json"))
    assert tokenizer.encode(text).ids == expected
    assert len(expected) > 500
    # transformers' own tokenizer for the directory agrees away from the ends it does not strip
    hf = AutoTokenizer.from_pretrained(str(crime["src"]))
    assert hf(text.strip())["input_ids"] == expected


# The first test of the store pays for two dynamo exports of the six-layer model with parity at
# 4096 tokens (and the memory probes at 1024 and 4096): over pytest's 600 s on two shared cores.
STORE_TIMEOUT_S = 2400


@pytest.fixture(scope="module")
def crime_store(crime: dict[str, Any]) -> Path:
    """Published twice at 4096 positions: as the LM it is, by default (no --max-context: the
    exporter bounds the 2^19-position table by memory, here a budget nothing fits, so the
    floor), and as an encoder of its hidden states (export --task encode, --max-context)."""
    store = crime["root"] / "store"
    requests = (
        ExportRequest(
            checkpoint=crime["out"], store=store, name="crime", format="onnx", progress=False,
            memory_budget=1,
        ),
        ExportRequest(
            checkpoint=crime["out"], store=store, name="crime-encode", format="onnx",
            max_context=4096, progress=False, task="encode",
        ),
    )  # fmt: skip
    for request in requests:
        result = export(request)
        assert result.report.passed and result.published.manifest.parity.lengths == [16, 4096]
    return store


@pytest.mark.slow
@pytest.mark.timeout(STORE_TIMEOUT_S)
def test_a_default_export_bounds_the_position_table_by_memory(crime_store: Path) -> None:
    """The default export verifies, and serves, no more than parity ran at; the record says
    what the probes of the published shape measured."""
    from model_store import ModelRepository

    manifest = ModelRepository(crime_store).resolve("crime").manifest
    bound = manifest.memory_bound
    assert bound is not None and (bound.limit, bound.budget_bytes) == (524288, 1)
    assert manifest.max_context == 4096 == max(manifest.parity.lengths) and not bound.fits
    assert bound.probe_lengths == [1024, 4096] and bound.per_token_bytes > 0
    assert bound.measured_peak_bytes is not None and bound.measured_peak_bytes > 0
    assert ModelRepository(crime_store).resolve("crime-encode").manifest.memory_bound is None


@pytest.mark.slow
@pytest.mark.timeout(STORE_TIMEOUT_S)
def test_exported_graph_equals_transformers(crime: dict[str, Any], crime_store: Path) -> None:
    from model_store import ModelRepository

    version = ModelRepository(crime_store).resolve("crime")
    assert version.manifest.config["bucket_factors"] == [64, 128]
    assert version.manifest.config["hash_seed"] == DEFAULT_HASH_SEED
    runner = OnnxRunner(version.model_path, ["logits", "hidden"])
    ref = seeded(crime["src"], DEFAULT_HASH_SEED)
    for length in (100, 3000):
        ids = torch.tensor(random_rows(320, [length], seed=length))
        got = runner.run({"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})
        with torch.no_grad():
            expected = ref(input_ids=ids).logits
        diff = float((torch.from_numpy(got["logits"]) - expected).abs().max())
        assert diff <= TOLERANCE, f"length {length}: max|diff| {diff:.2e}"


@pytest.fixture(scope="module")
def client(crime_store: Path) -> Iterator[TestClient]:
    settings = make_settings(crime_store, models=["crime", "crime-encode"])
    with TestClient(create_app(settings)) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.mark.slow
@pytest.mark.timeout(STORE_TIMEOUT_S)
def test_served_completion_is_the_references_greedy_text(
    client: TestClient, crime: dict[str, Any]
) -> None:
    tokenizer = load_checkpoint(crime["out"]).tokenizer
    prompt = _text(200_000)[160_000:163_000]
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        out = seeded(crime["src"], DEFAULT_HASH_SEED).generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
        )
    body = {"model": "crime", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["usage"]["prompt_tokens"] == ids.shape[1] > 600
    expected = out[0, ids.shape[1] :].tolist()
    if 2 in expected:  # the model's eos: generation stops there
        expected = expected[: expected.index(2)]
    assert data["choices"][0]["text"] == tokenizer.decode(expected)


@pytest.mark.slow
@pytest.mark.timeout(STORE_TIMEOUT_S)
def test_served_encode_pools_the_hidden_states(client: TestClient, crime: dict[str, Any]) -> None:
    prompt = _text(200_000)[170_000:172_000]
    response = client.post(
        "/v1/encode", json={"model": "crime-encode", "inputs": [prompt], "pooling": "mean"}
    )
    assert response.status_code == 200, response.text
    got = np.array(response.json()["embeddings"][0])
    model = load_checkpoint(crime["out"]).model
    ids = torch.tensor([load_checkpoint(crime["out"]).tokenizer.encode(prompt).ids])
    with torch.no_grad():
        _, hidden = model(ids, torch.ones_like(ids))
    assert got.shape == (512,)  # both streams, as HF's final LayerNorm sees them
    mean = hidden[0].mean(0).numpy()
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean), atol=1e-5)  # normalize: true


def test_enwik8_published_config_maps(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(ENWIK8))
    c = config_from_hf(tmp_path, ENWIK8)
    assert (c.vocab_size, c.n_buckets, c.bucket_factors, c.n_hashes) == (258, 512, (), 4)
    assert (c.chunk_length, c.local_chunk_length, c.max_positions) == (256, 128, 65536)
    assert c.hash_seed == DEFAULT_HASH_SEED and c.layer_kinds.count("lsh") == 3


@pytest.fixture(scope="module")
def enwik8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("enwik8")
    reference(ENWIK8_SMALL, seed=12).save_pretrained(root / "src")  # no tokenizer file at all
    result = import_checkpoint("hf-reformer", root / "src", root / "out")
    return {"src": root / "src", "out": root / "out", "result": result}


def test_enwik8_byte_vocabulary_is_detected_and_round_trips(enwik8: dict[str, Any]) -> None:
    ckpt = load_checkpoint(enwik8["out"])
    assert ckpt.extra["imported_from"]["byte_vocab_offset"] == 2
    assert any("ids = UTF-8 byte + 2" in note for note in enwik8["result"].notes)
    rng = np.random.default_rng(0)
    # any code point outside the surrogates: 1- to 4-byte UTF-8 sequences, NUL included
    points = rng.integers(0, 0x110000 - 0x800, size=5000)
    text = "".join(chr(int(p) + 0x800 if p >= 0xD800 else int(p)) for p in points) + "\x00é😀"
    ids = ckpt.tokenizer.encode(text).ids
    assert ids == [b + 2 for b in text.encode()]  # HF's enwik8 encode
    assert ckpt.tokenizer.decode(ids) == text
    assert ckpt.tokenizer.decode([0, 1, *ids, 0]) == text  # ids below 2 decode to nothing


@pytest.mark.parametrize("length", [7, 64, 300, 512])
def test_enwik8_shaped_model_equals_transformers_with_the_seed(
    enwik8: dict[str, Any], length: int
) -> None:
    ids = torch.tensor([[b + 2 for b in _text(200_000).encode()[:length]]])
    model = load_checkpoint(enwik8["out"]).model
    diff = logits_diff(seeded(enwik8["src"], DEFAULT_HASH_SEED), model, ids)
    assert diff <= TOLERANCE, f"length {length}: max|diff| {diff:.2e}"


def test_byte_vocabulary_offset_by_flag(enwik8: dict[str, Any], tmp_path: Path) -> None:
    """--byte-vocab-offset chooses the scheme explicitly; a vocabulary too small is refused."""
    import_checkpoint("hf-reformer", enwik8["src"], tmp_path / "o", byte_vocab_offset=2)
    with pytest.raises(ValueError, match="at least 259"):
        byte_tokenizer(3, 258)
