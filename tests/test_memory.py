"""The estimate's exact terms against what a real run holds, and against DESIGN §2.3's LLaMA-7B figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gnlorp.config import METHOD_NAMES, RunConfig
from gnlorp.engine import TrainingRun
from gnlorp.memory import estimate

SETTINGS = {"rank": 16, "max_steps": 1, "batch_size": 4, "seq_len": 64, "eval_every": 10, "checkpoint_every": 10}


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_estimated_optimizer_state_equals_the_bytes_a_run_holds(tmp_path, method, bits):
    cfg = RunConfig.from_dict({**SETTINGS, "method": method, "optim_bits": bits, "output": str(tmp_path)})
    predicted = estimate(cfg)
    run = TrainingRun(cfg)
    summary = run.run()
    assert predicted["optimizer_states"] + predicted["projectors"] == summary["optimizer_state_bytes"]
    assert predicted["trainable_params"] == summary["trainable_params"]
    assert predicted["weights"] == 4 * sum(p.numel() for p in run.model.parameters())


def test_llama_7b_figures_of_the_design():
    """DESIGN §2.3: 8 bytes/param of AdamW state = 53.9 GB; 8-bit GradNormLoRP at r=1024 with bf16 projectors
    keeps 1.88 GB of projectors and about 3.24 GB of projected moments plus 0.52 GB for embeddings and head."""
    full = estimate(RunConfig(model="llama-7b", method="full", optim_bits=32))
    assert full["optimizer_states"] == pytest.approx(53.9e9, rel=1e-3)
    ours = estimate(RunConfig(model="llama-7b", method="gradnormlorp", rank=1024, optim_bits=8))
    assert ours["projectors"] == pytest.approx(1.88e9, rel=5e-3)
    # 1 byte per moment entry plus one fp32 scale per 256-entry block (1.6%), and 3 fp32 numbers per output row
    # of every target (q, k, v, o, down: 4096 rows; gate, up: 11008) in each of the 32 layers.
    magnitudes = 3 * 4 * 32 * (5 * 4096 + 2 * 11008)
    assert ours["optimizer_states"] == pytest.approx((3.24e9 + 0.52e9) * (1 + 4 / 256) + magnitudes, rel=2e-3)
    assert 1 - (ours["optimizer_states"] + ours["projectors"]) / full["optimizer_states"] > 0.89


def test_estimate_cli_prints_the_design_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gnlorp", "estimate", "--model", "llama-60m", "--method", "galore",
                             "--rank", "128", "--batch-size", "2", "--seq-len", "256", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"weights", "gradients", "optimizer_states", "projectors", "activations", "total",
                         "trainable_params"}
    assert data["total"] == sum(data[k] for k in ("weights", "gradients", "optimizer_states", "projectors",
                                                  "activations"))
    assert data["activations"] >= 2 * 4 * 2 * 256 * 32000  # at least the logits and their gradient
