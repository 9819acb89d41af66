"""A BLOOM saved with ``save_pretrained`` and BLOOM's own trained length (2048, so the export's
extrapolation sweep runs 16K-token forwards and parity checks a 16K prompt) imports and exports
in bounded memory: the peak RSS of the two commands, run as a user runs them, stays under 4 GiB.

Unblocked, the same export held (heads × n × n) scores per layer and was killed by the OOM
killer at about 19 GB. Blocked, with the fused attention of docs/decisions.md, it peaks at
1.5 GiB in about 260 CPU-seconds (the sweep ~100 of them, the ONNX export and the 16K parity check
most of the rest).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from model_store import ModelRepository
from tests.exporters.importers.conftest import save_hf

PEAK_RSS_LIMIT = 4 * 2**30

# Runs the commands as its own children, so RUSAGE_CHILDREN sees exactly them (ru_maxrss of
# children is the largest single child's peak, in KiB on Linux).
MEASURE = """
import json, resource, subprocess, sys
for command in json.loads(sys.argv[1]):
    subprocess.run([sys.executable, "-m", "exporters", *command], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
"""


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~260 CPU-seconds in all; 20 min wall on 2 cores shared by 6 jobs
def test_default_bloom_imports_and_exports_within_4_gib(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, n_layer=3, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    src, ckpt, store = tmp_path / "src", tmp_path / "ckpt", tmp_path / "store"
    save_hf(BloomForCausalLM(config).eval(), tokenizer, src)  # random init, as saved by users

    commands = [
        ["import", "hf-bloom", str(src), "--out", str(ckpt)],  # no --trained-context: 2048
        ["export", str(ckpt), "--format", "onnx", "--store", str(store), "--name", "bloom"],
    ]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=1750,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    peak = int(done.stdout.strip().splitlines()[-1])

    manifest = ModelRepository(store).load_manifest("bloom")
    assert manifest.trained_context == 2048
    assert manifest.extrapolation is not None and manifest.extrapolation.lengths[-1] == 16384
    assert manifest.parity.passed and max(manifest.parity.lengths) >= 4096
    assert peak <= PEAK_RSS_LIMIT, f"peak RSS {peak / 2**30:.2f} GiB > 4 GiB"
