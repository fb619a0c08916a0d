"""Delete and rename runs, for the studio's Runs tab: only plain names directly under the runs folder, never the
run in progress, and with the studio's own records (run store, handed config, log) kept in step.

A rename keeps the run working: config.yaml's `output` (its own path) and the run store's paths follow the folder,
so resume, export and try of the renamed run read the new place. Nothing here imports torch or gradio.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import yaml

from ..atomic import strict_json, write_text_atomic
from ..config import ConfigError
from .jobs import JobError, JobManager
from .store import ACTIVE, JobState, read_job_states, studio_files

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
RESERVED = ("exports", "uploads")  # folders the studio keeps beside the runs


def check_name(name: str, what: str = "run name") -> str:
    """`name` stripped, if it is a plain folder name a run may have; else a ConfigError saying what to type."""
    name = (name or "").strip()
    if not name:
        raise ConfigError(f"{what}: none given; pick a run from the list or type a name")
    if not RUN_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"{what} {name!r} is not a plain folder name: use only letters, digits, '.', '_' and '-' "
                          "(up to 80, no '/'), starting with a letter or digit")
    if name in RESERVED:
        raise ConfigError(f"{what} {name!r} is the studio's own folder, not a run; choose another name")
    return name


def _existing(jobs: JobManager, name: str) -> Path:
    """The run folder of the existing run `name` (which may be gone, for a run that failed before writing it)."""
    name = check_name(name, "run")
    path = jobs.runs_dir / name
    if path.is_symlink():
        raise ConfigError(f"{path} is a link, not a run folder; the studio changes only its own run folders")
    if not (path / "config.yaml").is_file() and not studio_files(jobs.runs_dir, name)["state"].is_file():
        raise ConfigError(f"no run named {name!r} in {jobs.runs_dir}; pick one from the runs table")
    return path


def _refuse_active(jobs: JobManager, path: Path, doing: str) -> None:
    job = jobs.current()
    busy = job is not None and job.snapshot().active and Path(job.state.run_dir).name == path.name
    busy = busy or any(s.status in ACTIVE and Path(s.run_dir).name == path.name
                       for s in read_job_states(jobs.store_dir))
    if busy:
        raise JobError(f"{path.name} is training now; stop it on the Train tab and wait until it has stopped, "
                       f"then {doing} it")


def check_delete(jobs: JobManager, name: str) -> Path:
    """The run folder `delete_run` would remove, or the error it would give; for asking before deleting."""
    path = _existing(jobs, name)
    _refuse_active(jobs, path, "delete")
    return path


def delete_run(jobs: JobManager, name: str) -> Path:
    """Remove the run folder `name` and the studio's records of it (its exports stay); returns the removed path.

    The folder is first renamed to a hidden name, so the runs list never shows it half removed.
    """
    path = check_delete(jobs, name)
    if path.exists():
        doomed = path.with_name(f".{path.name}.deleting-{os.getpid()}")
        path.rename(doomed)
        shutil.rmtree(doomed)
    for record in studio_files(jobs.runs_dir, path.name).values():
        record.unlink(missing_ok=True)
    return path


def _set_output(config: Path, output: Path) -> None:
    """Point a run config's `output` at the run's folder, written atomically."""
    loaded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    if isinstance(loaded, dict):
        write_text_atomic(config, yaml.safe_dump({**loaded, "output": str(output)}, sort_keys=False))


def rename_run(jobs: JobManager, name: str, new_name: str) -> Path:
    """Rename the run folder `name` to `new_name` beside it, with its config and the studio's records following;
    returns the new path."""
    old = _existing(jobs, name)
    new = jobs.runs_dir / check_name(new_name, "new name")
    if new.name == old.name:
        raise ConfigError(f"the run is already called {old.name!r}; type a different new name")
    records, moved = studio_files(jobs.runs_dir, old.name), studio_files(jobs.runs_dir, new.name)
    if new.exists() or new.is_symlink() or moved["state"].exists():
        raise ConfigError(f"a run named {new.name!r} already exists in {jobs.runs_dir}; choose another name")
    _refuse_active(jobs, old, "rename")
    if old.exists():
        old.rename(new)
        if (new / "config.yaml").is_file():
            _set_output(new / "config.yaml", new)
    if records["config"].is_file():
        records["config"].rename(moved["config"])
        _set_output(moved["config"], new)
    if records["log"].is_file():
        records["log"].rename(moved["log"])
    if records["state"].is_file():
        state = JobState.from_dict(json.loads(records["state"].read_text(encoding="utf-8")))
        paths = {str(old): str(new), str(records["config"]): str(moved["config"])}
        state = replace(state, run_dir=str(new), command=[paths.get(arg, arg) for arg in state.command],
                        log_path=str(moved["log"]) if state.log_path == str(records["log"]) else state.log_path)
        write_text_atomic(moved["state"], strict_json(state.to_dict(), indent=1))
        records["state"].unlink()
    return new
