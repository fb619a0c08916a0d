"""Deleting, renaming and listing runs (gnlorp.runs: manage, store), with real training children.

Checked against independent records: the folders on disk, the child's own log line for a failed run, and a
renamed run resumed by the CLI continuing its logged steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gnlorp.config import ConfigError, RunConfig
from gnlorp.runs import JobError, JobManager, check_delete, delete_run, list_runs, rename_run

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {"model": "tiny", "data": str(ROOT / "presets" / "data" / "fortunes.jsonl"), "method": "gradnormlorp",
        "rank": 8, "batch_size": 2, "seq_len": 32, "warmup_steps": 1, "eval_every": 1000, "checkpoint_every": 2}
BAD_NAMES = ["", "..", ".", "../outside", "a/b", "/etc", ".studio", "exports", "uploads", "x" * 81, "-dash"]


def config(output: Path, **changes) -> RunConfig:
    return RunConfig.from_dict({**TINY, "output": str(output), **changes})


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def wait_idle(jobs: JobManager, timeout: float = 240) -> None:
    job = jobs.current()
    assert job is not None and job.wait(timeout), job.snapshot().state if job else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run written by the CLI, copied into each test's runs folder."""
    run = tmp_path_factory.mktemp("cli") / "run"
    subprocess.run([sys.executable, "-m", "gnlorp", "train", "--model", "tiny", "--data", TINY["data"],
                    "--max-steps", "4", "--seq-len", "32", "--batch-size", "2", "--checkpoint-every", "2",
                    "--output", str(run)], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    return run


def copy_run(trained: Path, runs: Path, name: str) -> Path:
    target = runs / name
    shutil.copytree(trained, target)
    cfg = yaml.safe_load((target / "config.yaml").read_text())
    (target / "config.yaml").write_text(yaml.safe_dump({**cfg, "output": str(target)}, sort_keys=False))
    return target


def test_bad_names_and_links_are_refused_and_nothing_changes(trained: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    copy_run(trained, runs, "keep")
    outside = copy_run(trained, tmp_path, "outside")
    (runs / "link").symlink_to(outside)
    (runs / "exports").mkdir()
    jobs = JobManager(runs, cwd=ROOT)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for name in [*BAD_NAMES, "link", "missing", str(runs / "keep")]:
        with pytest.raises(ConfigError):
            delete_run(jobs, name)
        with pytest.raises(ConfigError):
            rename_run(jobs, name, "fresh")
    for new in [*BAD_NAMES, "keep", "link", " keep "]:
        with pytest.raises(ConfigError):
            rename_run(jobs, "keep", new)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_the_running_run_is_refused_then_deleted_once_stopped(trained: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    jobs = JobManager(runs, cwd=ROOT, stop_grace_s=60)
    job = jobs.start(config(runs / "busy", max_steps=100_000))
    deadline = time.monotonic() + 240
    while job.snapshot().step < 1:
        assert time.monotonic() < deadline and job.snapshot().active, job.snapshot().state
        time.sleep(0.2)
    for attempt in (lambda: delete_run(jobs, "busy"), lambda: check_delete(jobs, "busy"),
                    lambda: rename_run(jobs, "busy", "other")):
        with pytest.raises(JobError, match="busy is training now"):
            attempt()
    assert [r.name for r in list_runs(runs)] == ["busy"] and (runs / "busy" / "config.yaml").is_file()

    jobs.stop()
    wait_idle(jobs)
    [stopped] = list_runs(runs)
    assert stopped.outcome() == ("stopped", None) and stopped.resumable and not stopped.finished
    assert delete_run(jobs, "busy") == runs / "busy"
    assert not (runs / "busy").exists() and list_runs(runs) == []
    studio = runs / ".studio"
    assert not any(studio.glob("*/busy.*")), sorted(studio.rglob("*"))


def test_a_renamed_run_resumes_and_exports_from_its_new_folder(trained: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    jobs = JobManager(runs, cwd=ROOT)
    jobs.start(config(runs / "first", max_steps=2))
    wait_idle(jobs)
    assert jobs.current().snapshot().state.status == "finished"
    [done] = list_runs(runs)
    assert done.finished and not done.resumable

    new = rename_run(jobs, "first", "second")
    assert new == runs / "second" and not (runs / "first").exists()
    assert yaml.safe_load((new / "config.yaml").read_text())["output"] == str(new)
    assert yaml.safe_load((runs / ".studio" / "configs" / "second.yaml").read_text())["output"] == str(new)
    [state] = jobs.stored()
    assert state.run_dir == str(new) and Path(state.log_path) == runs / ".studio" / "logs" / "second.log"
    assert Path(state.log_path).is_file() and str(runs / "first") not in json.dumps(state.to_dict())
    assert [r.name for r in list_runs(runs)] == ["second"]

    resumed = subprocess.run([sys.executable, "-m", "gnlorp", "train", "--resume", "--output", str(new),
                              "--max-steps", "4"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert steps_logged(new) == [1, 2, 3, 4]
    exported = subprocess.run([sys.executable, "-m", "gnlorp", "export", "--run", str(new), "--output",
                               str(tmp_path / "hf")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0 and (tmp_path / "hf" / "model.safetensors").is_file(), exported.stderr


def test_a_failed_run_is_listed_with_the_error_its_child_printed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    jobs = JobManager(runs, cwd=ROOT)
    jobs.start(config(runs / "broken", data=str(tmp_path / "missing.jsonl"), max_steps=4))
    wait_idle(jobs)
    printed = [line.split(": error: ", 1)[1] for line in (runs / ".studio" / "logs" / "broken.log").read_text()
               .splitlines() if line.startswith("gnlorp train: error: ")]
    assert printed and "missing.jsonl" in printed[-1]
    assert not (runs / "broken" / "config.yaml").exists()  # it failed before writing its folder
    [broken] = list_runs(runs)
    assert broken.name == "broken" and broken.outcome() == ("failed", printed[-1])
    assert broken.config["model"] == "tiny" and not broken.resumable
    delete_run(jobs, "broken")
    assert list_runs(runs) == [] and not any((runs / ".studio").glob("*/broken.*"))


def test_a_cli_run_s_error_log_shows_until_a_later_summary(trained: Path, tmp_path: Path) -> None:
    run = copy_run(trained, tmp_path / "runs", "crashed")
    summary = run / "summary.json"
    (run / "error.log").write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                                   "RuntimeError: the disk went away\n")
    os.utime(summary, (time.time() - 60, time.time() - 60))
    status, error = list_runs(run.parent)[0].outcome()
    assert status == "failed" and error.startswith("RuntimeError: the disk went away") and "error.log" in error
    os.utime(summary, (time.time() + 60, time.time() + 60))  # resumed and finished after the crash
    assert list_runs(run.parent)[0].outcome() == ("finished", None)
