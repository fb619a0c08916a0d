"""Fault injection: a trainer killed mid-checkpoint, a damaged checkpoint, a full disk, a studio restarted mid-run.

Each fault is real (SIGKILL while the checkpoint's temp folder is being written, a flipped byte, a tmpfs that
fills up, a studio killed and started again) and each recovery is checked against an independent record: the
losses the interrupted run logged before the fault must come out again, bit for bit, after resuming.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gnlorp.config import ConfigError, RunConfig
from gnlorp.engine import ErrorEvent, TrainingRun, WarningEvent

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = {"model": "tiny", "data": str(ROOT / "presets" / "data" / "fortunes.jsonl"), "method": "gradnormlorp",
        "rank": 8, "optim_bits": 8, "batch_size": 4, "seq_len": 32, "warmup_steps": 1, "lr": 3e-3}


def train(output: Path, resume: bool = False, **overrides) -> tuple[dict | None, list]:
    run = TrainingRun(RunConfig.from_dict({**FAST, "output": str(output), **overrides}), resume=resume)
    summary = run.run()
    events = []
    while not run.events.empty():
        events.append(run.events.get())
    return summary, events


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gnlorp", "train", *args]


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_and_the_previous_one_resumes_exactly(tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary, _ = train(run, max_steps=8, checkpoint_every=4, eval_every=100)
    assert summary is not None
    original = losses(run)
    newest = run / "checkpoints" / "step-000008"
    flip_byte(newest / "model.safetensors")  # one bit, inside the tensor data

    summary, events = train(run, resume=True, max_steps=8, checkpoint_every=4, eval_every=100)
    assert summary is not None, events
    warnings = [e.message for e in events if isinstance(e, WarningEvent)]
    assert len(warnings) == 1 and "step-000008" in warnings[0] and "SHA-256" in warnings[0], warnings
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(5, 9)] == [original[s] for s in range(5, 9)]  # redone from step 4, exactly
    metrics = (run / "metrics.jsonl").read_text()
    assert "skipped a damaged checkpoint" in metrics

    for checkpoint in (run / "checkpoints").glob("step-*"):
        flip_byte(checkpoint / "optimizer.pt", offset=-20)
    summary, events = train(run, resume=True, max_steps=12, checkpoint_every=4, eval_every=100)
    error = events[-1]
    assert summary is None and isinstance(error, ErrorEvent) and not error.internal
    assert "no intact checkpoint" in error.message and "start a new run" in error.message
    assert "\n" not in error.message


def test_export_and_try_refuse_damaged_final_weights(tmp_path: Path) -> None:
    from gnlorp.export import export_run
    from gnlorp.infer import inspect_source

    run = tmp_path / "run"
    assert train(run, max_steps=2, checkpoint_every=2, eval_every=100)[0] is not None
    assert json.loads((run / "final" / "manifest.json").read_text())["step"] == 2
    flip_byte(run / "final" / "model.safetensors")
    with pytest.raises(ConfigError, match=r"final: model.safetensors does not match its SHA-256"):
        export_run(run, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(ConfigError, match="does not match its SHA-256"):
        inspect_source(run)


def wait_for_checkpoint_write(process: subprocess.Popen, checkpoints: Path, min_step: int, timeout: float = 240) -> str:
    """Poll until the temp folder of a checkpoint at `min_step` or later exists, freeze the trainer there (SIGSTOP)
    and return the checkpoint's name. If the rename beat the freeze, let it go on and catch the next one.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        temp = [e.name for e in os.scandir(checkpoints)] if checkpoints.is_dir() else []
        temp = [name for name in temp if name.startswith(".step-") and ".tmp-" in name
                and int(name[1:].split(".tmp-")[0].split("-")[1]) >= min_step]
        if temp:
            os.kill(process.pid, signal.SIGSTOP)
            target = temp[0][1:].split(".tmp-")[0]
            if (checkpoints / temp[0]).is_dir() and not (checkpoints / target).exists():
                return target
            os.kill(process.pid, signal.SIGCONT)
            while (checkpoints / temp[0]).exists():
                time.sleep(0.001)
        time.sleep(0.0005)
    raise AssertionError(f"never caught a checkpoint being written (exit code {process.poll()})")


def test_kill_9_mid_checkpoint_resumes_exactly_from_the_previous_one(tmp_path: Path) -> None:
    run = tmp_path / "run"
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    process = subprocess.Popen(cli(*settings, "--max-steps=16", "--checkpoint-every=2", "--eval-every=100",
                                   f"--output={run}"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        caught = wait_for_checkpoint_write(process, run / "checkpoints", min_step=4)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    killed_at = int(caught.split("-")[1])
    before = losses(run)
    assert max(before) >= killed_at  # the steps up to the checkpoint were logged before the kill

    done = subprocess.run(cli("--resume", f"--output={run}"), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = losses(run)
    assert sorted(after) == list(range(1, 17))
    previous = killed_at - 2
    assert [after[s] for s in range(previous + 1, killed_at + 1)] == \
           [before[s] for s in range(previous + 1, killed_at + 1)]  # the steps after the good checkpoint, bit for bit
    assert not list((run / "checkpoints").glob(".step-*")), "the killed save's temp folder is cleaned up"
