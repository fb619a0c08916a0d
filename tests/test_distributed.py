"""Data-parallel training: two CPU processes (torchrun, gloo) through the engine end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from gnlorp.config import RunConfig
from gnlorp.train.engine import TrainingRun

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"method": "gradnormlorp", "optim_bits": 32, "max_steps": 6, "seq_len": 32, "update_proj_gap": 3,
            "eval_every": 6}

# Each rank trains through the engine, then saves the weights it ended with, so the ranks can be compared.
RANK_SCRIPT = """
import json, sys
from accelerate import PartialState
from safetensors.torch import save_file
from gnlorp.config import RunConfig
from gnlorp.train.engine import TrainingRun

output, weights_dir, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
run = TrainingRun(RunConfig.from_dict({"output": output, **settings}))
run.run()
state = {name: tensor.contiguous() for name, tensor in run.model.state_dict().items()}
save_file(state, f"{weights_dir}/rank{PartialState().process_index}.safetensors")
"""


def test_two_processes_end_with_identical_weights_equal_to_one_process_on_their_joint_batch(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               str(script), str(tmp_path / "run"), str(tmp_path), json.dumps({**SETTINGS, "batch_size": 2})]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all((rank0[k] == rank1[k]).all() for k in rank0)
    saved = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all((saved[k] == rank0[k]).all() for k in saved)
    # Averaged gradients of two shards of 2 equal those of one batch of 4: proof the ranks really shared work.
    single = TrainingRun(RunConfig.from_dict({"output": str(tmp_path / "single"), **SETTINGS, "batch_size": 4}))
    single.run()
    reference = single.model.state_dict()
    assert max((reference[k] - rank0[k]).abs().max().item() for k in rank0) < 1e-4
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum('"loss"' in line for line in metrics) == SETTINGS["max_steps"], "only the main process writes"
