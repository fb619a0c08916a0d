"""Sharded training (--fsdp): two CPU processes (torchrun, gloo) through the engine, against one process.

One torchrun launch trains four runs in a row (starting processes is most of the cost): GradNormLoRP with 32-bit
and 8-bit states, that run resumed from its middle checkpoint, and LoRA (peft on FSDP2). The references are the
same runs in one process on the joint batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gnlorp.cli.main import main
from gnlorp.config import ConfigError, RunConfig
from gnlorp.train.engine import TrainingRun

REPO = Path(__file__).resolve().parents[1]
BASE = {"max_steps": 6, "seq_len": 32, "update_proj_gap": 3, "eval_every": 6, "checkpoint_every": 3}
RUNS = {
    "gnl32": {**BASE, "method": "gradnormlorp", "optim_bits": 32},
    "gnl8": {**BASE, "method": "gradnormlorp", "optim_bits": 8},
    "lora": {**BASE, "method": "lora", "optim_bits": 32, "lr": 1e-3},
}

RANK_SCRIPT = """
import json, shutil, sys
from pathlib import Path
import torch.distributed as dist
from gnlorp.config import ConfigError, RunConfig
from gnlorp.train.engine import TrainingRun

root, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
for name, settings in runs.items():
    summary = TrainingRun(RunConfig.from_dict({"output": str(root / name), **settings, "fsdp": True})).run()
    log = root / name / "error.log"
    assert summary is not None, log.read_text() if log.exists() else name
# Resume the 32-bit run from its step-3 checkpoint, in a copy with everything after step 3 removed.
if dist.get_rank() == 0:
    shutil.copytree(root / "gnl32", root / "resumed")
    shutil.rmtree(root / "resumed" / "checkpoints" / "step-000006")
    shutil.rmtree(root / "resumed" / "final")
    (root / "resumed" / "summary.json").unlink()
dist.barrier()
settings = {"output": str(root / "resumed"), **runs["gnl32"], "fsdp": True}
assert TrainingRun(RunConfig.from_dict(settings), resume=True).run() is not None
# A library may hand back a norm as a row-sharded DTensor (accelerate <= 1.15) or as a plain tensor (>= 1.16).
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from gnlorp.train.sharding import full_value
whole = torch.arange(6.0)
sharded = distribute_tensor(whole, init_device_mesh("cpu", (dist.get_world_size(),)), [Shard(0)])
values = [full_value(sharded).tolist(), full_value(whole).tolist()]  # a collective: every rank calls it
if dist.get_rank() == 0:
    (root / "full_value.json").write_text(json.dumps(values))
"""


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    script = root / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = {name: {**settings, "batch_size": 2} for name, settings in RUNS.items()}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
               str(script), str(root), json.dumps(runs)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The same runs in one process, on batches of 4: the joint batch of two ranks of 2."""
    root = tmp_path_factory.mktemp("single")
    for name, settings in RUNS.items():
        assert TrainingRun(RunConfig.from_dict({"output": str(root / name), **settings, "batch_size": 4})).run()
    return root


def _losses(run: Path) -> list[float]:
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [line["loss"] for line in lines if "loss" in line]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _max_relative(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == BASE["max_steps"]
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["gnl32", "lora"])
def test_32_bit_sharded_losses_and_weights_equal_one_process(sharded, single, name):
    assert _max_relative(_losses(sharded / name), _losses(single / name)) < 1e-4
    ours, reference = load_file(sharded / name / "final" / "model.safetensors"), \
        load_file(single / name / "final" / "model.safetensors")
    assert ours.keys() == reference.keys()
    assert max(float((ours[k] - reference[k]).abs().max()) for k in ours) < 1e-4
    if name == "lora":  # the adapter folder is saved from the gathered weights too
        assert (sharded / name / "adapter" / "adapter_model.safetensors").is_file()


def test_the_gradient_norm_is_the_whole_models_whatever_type_accelerate_returns(sharded, single):
    # The clipped norm is logged as a number: sharded, it must be the whole model's norm, as one process logs it.
    def norms(run: Path) -> list[float]:
        lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
        return [line["grad_norm"] for line in lines if "loss" in line]
    assert _max_relative(norms(sharded / "gnl32"), norms(single / "gnl32")) < 1e-4
    as_dtensor, as_plain = json.loads((sharded / "full_value.json").read_text())
    assert as_dtensor == as_plain == list(range(6))


def test_a_sharded_run_logs_the_spectrum_one_process_logs(sharded, single):
    # Each matrix's owner takes its SVD; rank 0 writes every record, in model order, as one process does.
    ours, reference = ([json.loads(line) for line in (root / "gnl32" / "spectrum.jsonl").read_text().splitlines()]
                       for root in (sharded, single))
    assert [(s["step"], s["name"], s["rank_for"]) for s in ours] == \
        [(s["step"], s["name"], s["rank_for"]) for s in reference]
    assert max(abs(a["energy_kept"] - b["energy_kept"]) for a, b in zip(ours, reference, strict=True)) < 1e-5
    assert _summary(sharded / "gnl32")["rank_advice"] == _summary(single / "gnl32")["rank_advice"]


def test_8_bit_sharded_losses_stay_close_to_one_process(sharded, single):
    # Blocks fall where one process puts them (optim/sharded.py), so the runs differ only where a gradient summed
    # in another order moves a value across an 8-bit code boundary.
    assert _max_relative(_losses(sharded / "gnl8"), _losses(single / "gnl8")) < 1e-3


@pytest.mark.parametrize("name", ["gnl32", "gnl8", "lora"])
def test_each_rank_holds_half_of_the_optimizer_state(sharded, single, name):
    ours, reference = _summary(sharded / name), _summary(single / name)
    assert ours["world_size"] == 2 and reference["world_size"] == 1
    assert 0.45 < ours["optimizer_state_bytes"] / reference["optimizer_state_bytes"] < 0.55
    assert ours["predicted_optimizer_state_bytes"] == ours["optimizer_state_bytes"]


def test_estimate_per_gpu_counts_the_optimizer_state_each_rank_held(sharded, single, capsys):
    args = ["estimate", "--config", str(sharded / "gnl32" / "config.yaml"), "--gpus", "2", "--json"]
    assert main(args) == 0
    per_gpu = json.loads(capsys.readouterr().out)
    fsdp, ddp = per_gpu["fsdp"], per_gpu["ddp"]
    held = _summary(sharded / "gnl32")["optimizer_state_bytes"]
    assert fsdp["optimizer_states"] + fsdp["projectors"] == held  # counted from the tensors rank 0 held
    whole = _summary(single / "gnl32")["optimizer_state_bytes"]
    assert ddp["optimizer_states"] + ddp["projectors"] == whole  # data-parallel: every rank holds it all
    # Data-parallel keeps a second copy of every gradient in its all-reduce buckets; sharded, 1/N of them plus the
    # whole gradients of the unit being reduced. On a 4-layer model the gathered root and blocks outweigh the
    # halved weights: FSDP pays off on large models, which is what the per-GPU table is for.
    assert fsdp["gradients"] < ddp["gradients"]
    assert fsdp["weights"] > ddp["weights"] // 2
    assert main(args + ["--compare"]) != 0 and "choose one" in capsys.readouterr().err


def test_resume_from_a_sharded_checkpoint_is_exact(sharded):
    assert _losses(sharded / "resumed") == _losses(sharded / "gnl32")
    resumed, straight = (load_file(sharded / r / "final" / "model.safetensors") for r in ("resumed", "gnl32"))
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not any((sharded / "gnl32" / "checkpoints").rglob("*.pt")), "sharded checkpoints hold no pickle"


def test_export_of_a_sharded_run_reloads_with_the_one_process_logits(sharded, single, tmp_path):
    assert main(["export", "--run", str(sharded / "gnl32"), "--output", str(tmp_path / "export")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    reference.load_state_dict(load_file(single / "gnl32" / "final" / "model.safetensors"))
    ids = torch.arange(1, 33)[None]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-4)


def test_fsdp_in_one_process_says_how_to_start_it(tmp_path, capsys):
    code = main(["train", "--model", "tiny", "--method", "galore", "--max-steps", "1", "--fsdp",
                 "--output", str(tmp_path / "run")])
    assert code != 0
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


def test_accelerate_launch_with_its_fsdp_plugin_turns_sharding_on(tmp_path, capsys, monkeypatch):
    # `accelerate launch --use_fsdp --fsdp_version 2` marks the processes so; alone, the run says how to start it.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    code = main(["train", "--model", "tiny", "--method", "galore", "--max-steps", "1", "--output", str(tmp_path / "r")])
    assert code != 0
    assert "--fsdp shards over several processes" in capsys.readouterr().err


def test_the_studio_runs_a_sharded_job_on_two_processes_stops_it_and_resumes_it(tmp_path):
    """What the studio's GPUs choice does: JobManager starts torchrun; Stop reaches each worker (torchrun itself
    would terminate them), they agree on a step, save one sharded checkpoint and end; Resume starts two again."""
    from gnlorp.runs.jobs import JobManager

    manager = JobManager(tmp_path / "runs")
    cfg = RunConfig.from_dict({"output": str(tmp_path / "runs" / "sharded"), **RUNS["gnl32"], "batch_size": 2,
                               "max_steps": 100_000, "checkpoint_every": 100_000, "eval_every": 100_000,
                               "fsdp": True})
    job = manager.start(cfg, gpus=2)
    deadline = time.monotonic() + 240
    while job.snapshot().step < 2:
        assert time.monotonic() < deadline and job.snapshot().active, job.snapshot().log[-20:]
        time.sleep(0.2)
    manager.stop()
    assert job.wait(240)
    state = job.snapshot().state
    assert state.status == "stopped" and state.stop_stage == "save", (state, job.snapshot().log[-20:])
    run = Path(state.run_dir)
    [checkpoint] = run.glob("checkpoints/step-*")
    assert (checkpoint / "state").is_dir()
    stopped_at = int(checkpoint.name.split("-")[1])
    assert _summary(run)["world_size"] == 2 and _summary(run)["steps"] == stopped_at
    resumed = manager.resume(run, max_steps=stopped_at + 2)
    assert resumed.wait(240) and resumed.snapshot().state.status == "finished", resumed.snapshot().log[-20:]
    assert _summary(run)["world_size"] == 2 and len(_losses_of(run)) == stopped_at + 2


def _losses_of(run: Path) -> list[float]:
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [line["loss"] for line in lines if "loss" in line]


def test_layerwise_steps_with_fsdp_are_one_clear_error():
    with pytest.raises(ConfigError, match="layerwise cannot run with fsdp"):
        RunConfig.from_dict({"method": "galore", "layerwise": True, "max_grad_norm": 0.0, "fsdp": True}).validate()
