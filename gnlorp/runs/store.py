"""What the studio knows about runs, stored and read back: each job's state record (the run store's JSON), its
snapshots, the metrics a run folder's metrics.jsonl holds, and the list of run folders for the runs table.

Kept apart from jobs.py (which starts and follows the child processes) so the tabs that only read runs need
none of that machinery. Nothing here imports torch or gradio.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import checkpoints, refuse_if_finished
from ..config import ConfigError

ACTIVE = ("starting", "running", "stopping")


@dataclass
class JobState:
    """What the studio knows about a job: small and plain, so a run store can write it to disk as JSON."""

    run_dir: str
    command: list[str]
    max_steps: int
    log_path: str
    status: str = "starting"  # starting, running, stopping, then finished, stopped or failed
    pid: int | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    returncode: int | None = None
    error: str | None = None
    predicted_peak_bytes: int | None = None
    create_time: float | None = None  # with pid, tells the trainer from a later process given the same pid
    step: int = 0  # the last logged step (the run store's copy; the snapshot reads metrics.jsonl)
    config_sha256: str | None = None  # checkpoint.config_hash of the run's settings
    stop_stage: str | None = None  # how far the stop ladder went: save, cancel, terminate or kill
    memory_freed: bool | None = None  # after a stop: no process of its group (nor its GPU memory) is left

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobState:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Snapshot:
    """A consistent copy of a job for drawing: its state, every metrics record so far and the log's tail."""

    state: JobState
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    log: list[str]
    version: int  # grows whenever anything above changes, so a poller can skip redrawing

    @property
    def active(self) -> bool:
        return self.state.status in ACTIVE

    @property
    def step(self) -> int:
        return self.steps[-1]["step"] if self.steps else 0

    def eta_s(self, window: int = 20) -> float | None:
        """Seconds left at the pace of the last `window` steps this job logged; None before it logged two.

        Steps of an earlier segment of a resumed run are left out: the pause between the segments is not training."""
        recent = [r for r in self.steps if r.get("time", 0) >= self.state.started_at][-window:]
        if len(recent) < 2 or recent[-1]["step"] <= recent[0]["step"]:
            return None
        per_step = (recent[-1]["time"] - recent[0]["time"]) / (recent[-1]["step"] - recent[0]["step"])
        return max(0.0, per_step * (self.state.max_steps - recent[-1]["step"]))


class MetricsReader:
    """Reads a metrics.jsonl as it grows, one complete line at a time; starts over when the file is replaced
    (a resumed run rewrites it without the steps after its checkpoint)."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._offset = 0
        self._inode: int | None = None
        self._partial = b""

    def read(self) -> bool:
        """Take in new complete lines; True when the records changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return False
        changed = False
        if stat.st_ino != self._inode or stat.st_size < self._offset:
            self.records, self._offset, self._partial, self._inode = [], 0, b"", stat.st_ino
            changed = True
        if stat.st_size == self._offset:
            return changed
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            try:
                self.records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash; the run's own reader would fail on it too
        return changed or bool(lines)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run folder's metrics.jsonl (none when it has none yet)."""
    reader = MetricsReader(Path(run_dir) / "metrics.jsonl")
    reader.read()
    return reader.records


SAMPLES_FILE = "samples.jsonl"  # the training run's samples (gnlorp/train/samples.py writes it)


def read_samples(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run folder's samples.jsonl (`step`, `prompt`, `text`); none when it has none yet."""
    reader = MetricsReader(Path(run_dir) / SAMPLES_FILE)
    reader.read()
    return reader.records


def prompt_text(prompt: str | list[dict[str, Any]]) -> str:
    """A sample's prompt in words: the text, or a conversation's last (user) message."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", "")) if prompt else ""


def sample_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per prompt, in the order first sampled: `prompt`, the first answer (`base`, at `base_step`, step 0 for
    a run sampled from its start) and the latest (`text` at `step`)."""
    rows: dict[str, dict[str, Any]] = {}
    for record in records:
        key = json.dumps(record.get("prompt"), sort_keys=True)
        row = rows.setdefault(key, {"prompt": prompt_text(record.get("prompt", "")), "base": record.get("text", ""),
                                    "base_step": record.get("step")})
        row |= {"text": record.get("text", ""), "step": record.get("step")}
    return list(rows.values())


@dataclass
class RunRecord:
    """A run as the runs table shows it: its config, its summary (once it ended), its metrics and the studio's record
    of its last job (None for a run the studio did not start)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    job: JobState | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def exportable(self) -> bool:
        return (self.path / "final" / "model.safetensors").is_file()

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """The run's eval.json (its held-out figures and its base model's), None until one is written."""
        try:
            value = json.loads((self.path / "eval.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def samples(self) -> list[dict[str, Any]]:
        """sample_rows of the run's samples.jsonl: each prompt's first and latest answer."""
        return sample_rows(read_samples(self.path))

    @property
    def finished(self) -> bool:
        """Trained to its last step: a resume would have nothing left to do."""
        summary = self.summary or {}
        return summary.get("status") == "finished" and summary.get("steps") == self.config.get("max_steps")

    @property
    def resumable(self) -> bool:
        """It has a checkpoint, did not finish, and JobManager.resume would take it at its own step count."""
        if self.finished or not checkpoints(self.path):
            return False
        try:
            refuse_if_finished(self.path, int(self.config.get("max_steps") or 0))
        except (ConfigError, ValueError):
            return False
        return True

    def outcome(self) -> tuple[str, str | None]:
        """(status, one-line error or None): a job in progress, else the newest of the summary and any failure.

        A failure is the studio's job error or, for a run started from the CLI, the last line of its error.log; a
        summary written after it (the run was resumed and ended) wins.
        """
        job = self.job
        if job is not None and job.status in ACTIVE:
            return job.status, None
        failures = []
        if job is not None and job.status == "failed":
            failures.append((job.ended_at or job.started_at, job.error or "the run failed; see its log"))
        log = self.path / "error.log"
        last = _last_line(log)
        if last:
            failures.append((_mtime(log), f"{last} (traceback in {log})"))
        failed_at, error = max(failures, key=lambda f: f[0], default=(None, None))
        summary_at = _mtime(self.path / "summary.json") if self.summary is not None else None
        if failed_at is not None and (summary_at is None or failed_at >= summary_at):
            return "failed", error
        if self.summary is not None:
            return str(self.summary.get("status", "ended")), None
        if job is not None:
            return job.status, job.error
        return "no summary (running or ended early)", None

    def sort_key(self) -> float:
        return _mtime(self.path) or (self.job.started_at if self.job is not None else 0.0)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _last_line(path: Path) -> str | None:
    """The last non-empty line of a small text file (a traceback's ends with the exception), else None."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return next((line.strip()[:300] for line in reversed(lines) if line.strip()), None)


def studio_dir(runs_dir: str | os.PathLike) -> Path:
    """The studio's own files in a runs folder (its run store, the configs it hands runs, their logs)."""
    return Path(runs_dir) / ".studio"


def studio_files(runs_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """The studio's own files about the run `name`: its job state, the config it handed the run, and its log."""
    studio = studio_dir(runs_dir)
    return {"state": studio / "jobs" / f"{name}.json", "config": studio / "configs" / f"{name}.yaml",
            "log": studio / "logs" / f"{name}.log"}


def read_job_states(store_dir: Path) -> list[JobState]:
    """Every job in a run store, newest first (unreadable entries are left out)."""
    states = []
    for path in store_dir.glob("*.json"):
        try:
            states.append(JobState.from_dict(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError):
            continue
    return sorted(states, key=lambda s: s.started_at, reverse=True)


def _read_yaml(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return loaded if isinstance(loaded, dict) else {}


def list_runs(runs_dir: str | os.PathLike) -> list[RunRecord]:
    """Every run directly under `runs_dir`, newest first: each folder holding config.yaml, and each job of the run
    store whose folder has none yet (a run that failed or is still starting before its config was written)."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    jobs = {Path(s.run_dir).name: s for s in reversed(read_job_states(studio_dir(root) / "jobs"))
            if Path(s.run_dir).parent == root.resolve()}  # the newest job of each run
    found = []
    for path in root.iterdir():
        config = path / "config.yaml"
        if path.name.startswith(".") or not config.is_file():
            continue
        try:
            loaded = _read_yaml(config)
            summary_path = path / "summary.json"
            summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        except (OSError, ValueError, yaml.YAMLError):
            continue  # a folder being written or damaged is left out rather than breaking the table
        found.append(RunRecord(path, loaded, summary, read_metrics(path), jobs.pop(path.name, None)))
    for name, state in jobs.items():
        if state.status == "finished":
            continue  # its folder was removed by hand: nothing is left to show
        handed = studio_files(root, name)["config"]
        try:
            loaded = _read_yaml(handed) if handed.is_file() else {}
        except (OSError, yaml.YAMLError):
            loaded = {}
        found.append(RunRecord(root / name, loaded, None, read_metrics(root / name), state))
    return sorted(found, key=RunRecord.sort_key, reverse=True)
