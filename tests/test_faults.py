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

import httpx
import psutil
import pytest

from gnlorp.config import ConfigError, RunConfig
from gnlorp.train.engine import ErrorEvent, TrainingRun, WarningEvent

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
    """Step -> loss from metrics.jsonl; a last line cut short by the fault is not a record."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return {r["step"]: r["loss"] for r in records if "loss" in r}


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
    from gnlorp.export.infer import inspect_source

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


def start_studio(runs: Path) -> tuple[subprocess.Popen, str]:
    """app.py in a subprocess that the test may kill -9 (studio_process.studio always ends it gently)."""
    from studio_process import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs)], cwd=ROOT,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, "the studio exited"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise TimeoutError(url)


def wait_status(client, done, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.predict(api_name="/status")
        if done(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"timed out; last status {state}")


def test_a_restarted_studio_follows_the_running_training_again_and_stops_it(tmp_path: Path) -> None:
    from gradio_client import Client

    from studio_process import studio

    runs = tmp_path / "runs"
    first, url = start_studio(runs)
    try:
        client = Client(url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/start"]["parameters"]
        values = {p["label"]: p["parameter_default"] for p in api}
        # So many steps that the run is still going when the test stops it, however loaded the machine.
        values.update({"Run name": "long", "Steps": 100_000, "Batch size": 4, "Sequence length": 32,
                       "Checkpoint every": 5, "Eval every": 400})
        assert "started" in client.predict(*[values[p["label"]] for p in api], api_name="/start")[0]
        before = wait_status(client, lambda s: s["train_points"] >= 2)
    finally:
        first.kill()  # the studio crashes; its training lives on in its own process group
        first.wait()
    assert psutil.pid_exists(before["pid"])

    with studio(runs) as url:
        client = Client(url, verbose=False)
        again = client.predict(api_name="/status")
        assert again["status"] == "running" and again["pid"] == before["pid"], again
        later = wait_status(client, lambda s: s["step"] > again["step"] + 1)
        assert later["pid"] == before["pid"]
        assert "stopping" in client.predict(api_name="/stop")
        stopped = wait_status(client, lambda s: s["status"] not in ("starting", "running", "stopping"))
    assert stopped["status"] == "stopped" and stopped["stop_stage"] == "save" and stopped["memory_freed"], stopped
    assert not psutil.pid_exists(stopped["pid"]) or psutil.Process(stopped["pid"]).status() == psutil.STATUS_ZOMBIE
    saved = json.loads((runs / ".studio" / "jobs" / "long.json").read_text())
    assert saved["status"] == "stopped" and saved["step"] == stopped["step"]
    last = sorted((runs / "long" / "checkpoints").glob("step-*"))[-1]
    assert int(last.name.split("-")[1]) == max(losses(runs / "long"))  # stop saved at the step it reached


CRASHED_STUDIO = """
import sys, time, os
from pathlib import Path
from gnlorp.config import RunConfig
from gnlorp.runs.jobs import JobManager
runs = Path(sys.argv[1])
manager = JobManager(runs)
cfg = RunConfig.from_dict({**__import__("json").loads(sys.argv[2]), "output": str(runs / "crashed")})
job = manager.start(cfg)
while not list((runs / "crashed" / "checkpoints").glob("step-*")):
    time.sleep(0.1)
print(job.state.pid, flush=True)
os._exit(0)  # the studio dies without stopping its run
"""


def test_a_run_that_died_with_no_studio_watching_is_marked_failed_and_resumes(tmp_path: Path) -> None:
    from gnlorp.runs.jobs import JobManager

    runs = tmp_path / "runs"
    settings = {**FAST, "max_steps": 400, "checkpoint_every": 2, "eval_every": 400}
    crashed = subprocess.run([sys.executable, "-c", CRASHED_STUDIO, str(runs), json.dumps(settings)], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=300)
    pid = int(crashed.stdout.strip())
    os.killpg(pid, signal.SIGKILL)  # then the trainer dies too, with nobody watching
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.05)

    manager = JobManager(runs)
    assert manager.current() is None
    deadline = time.monotonic() + 30
    while (state := manager.stored()[0]).status in ("starting", "running", "stopping"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert state.status == "failed" and "resume crashed from its last checkpoint" in state.error, state
    logged = losses(runs / "crashed")
    saved = (runs / "crashed").glob("checkpoints/step-*/manifest.json")
    checkpoint = max(int(p.parent.name.split("-")[1]) for p in saved)
    job = manager.resume(runs / "crashed", max_steps=max(logged) + 2)
    assert job.wait(240) and job.snapshot().state.status == "finished", job.snapshot().state
    resumed = losses(runs / "crashed")
    assert sorted(resumed) == list(range(1, max(logged) + 3))
    assert [resumed[s] for s in logged if s > checkpoint] == [logged[s] for s in logged if s > checkpoint]


def fill(disk: Path) -> Path:
    """Write a file until the disk is full (down to single bytes); return it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                continue
    return filler


def disk_full_scenario(disk: Path, out: Path) -> None:
    """Inside a private mount namespace: train onto a small tmpfs, fill it, then free it and resume."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], check=True)
    run = disk / "run"
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    process = subprocess.Popen(cli(*settings, "--max-steps=400", "--checkpoint-every=2", "--eval-every=400",
                                   f"--output={run}"), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    while not list(run.glob("checkpoints/step-*/manifest.json")) and process.poll() is None:
        time.sleep(0.05)
    filler = fill(disk)
    _, stderr = process.communicate(timeout=300)
    result = {"first_rc": process.returncode, "first_stderr": stderr, "logged": losses(run)}
    filler.unlink()
    steps = max(result["logged"]) + 2
    done = subprocess.run(cli("--resume", f"--output={run}", f"--max-steps={steps}"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    result.update(resume_rc=done.returncode, resume_stderr=done.stderr[-2000:], resumed=losses(run), steps=steps)
    out.write_text(json.dumps(result))


def test_a_full_disk_is_a_clear_error_and_the_run_resumes(tmp_path: Path) -> None:
    disk, out = tmp_path / "disk", tmp_path / "result.json"
    disk.mkdir()
    try:
        done = subprocess.run(["unshare", "--mount", "--map-root-user", sys.executable, __file__, "disk-full",
                               str(disk), str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        pytest.skip("unshare (util-linux) is not installed")
    if "mount" in done.stderr and not out.exists() and "Operation not permitted" in done.stderr:
        pytest.skip(f"this machine allows no private tmpfs: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    lines = result["first_stderr"].strip().splitlines()
    assert result["first_rc"] == 2 and "Traceback" not in result["first_stderr"], result["first_stderr"][-2000:]
    assert "is full (no space left on device)" in lines[-1] and "--resume" in lines[-1] and str(disk) in lines[-1]
    assert result["resume_rc"] == 0, result["resume_stderr"]
    logged = {int(k): v for k, v in result["logged"].items()}
    resumed = {int(k): v for k, v in result["resumed"].items()}
    assert sorted(resumed) == list(range(1, result["steps"] + 1))
    assert all(resumed[s] == logged[s] for s in logged)  # redone steps give the same losses: resumed, not restarted


if __name__ == "__main__" and sys.argv[1:2] == ["disk-full"]:
    disk_full_scenario(Path(sys.argv[2]), Path(sys.argv[3]))
