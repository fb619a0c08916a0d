"""Training jobs for the studio: each run is a child process running the CLI, followed by a background thread.

A run in its own process cannot take the studio down when it runs out of memory or crashes, gives its
memory back when it ends, and is stopped the way a terminal user stops it: SIGINT makes the CLI save a
checkpoint after the current step; terminate and then kill follow only if it does not end in time.
The follower thread reads the run folder's metrics.jsonl and the child's output, so callers (the studio's
timer) only ever copy a snapshot and never wait. One run at a time. Nothing here imports torch or gradio.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import yaml

from .atomic import write_text_atomic
from .checkpoint import config_hash
from .config import ConfigError, RunConfig

ACTIVE = ("starting", "running", "stopping")
ERROR_LINE = re.compile(r"^gnlorp(?: \w+)?: error: (.+)$")
LOG_LINES = 400
LOG_TAIL_BYTES = 1 << 18  # how much of a log a restarted studio reads back to show
POLL_S = 0.2
STORE_EVERY_S = 2.0  # the run store gets the step at most this often (and every change of status at once)
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|AUTH|CREDENTIAL|COOKIE", re.IGNORECASE)
REDACTED = "[redacted]"
_extra_secrets: set[str] = set()


def add_secret(value: str) -> None:
    """Register a secret that is not in the environment (the studio's --auth password) for `redact`."""
    if len(value) >= 4:
        _extra_secrets.add(value)


def secret_values() -> list[str]:
    """Values of environment variables named like tokens, keys or passwords, and registered secrets, longest first."""
    found = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 4} | _extra_secrets
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret value replaced, for anything the studio shows or writes."""
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a training or try child: the studio's, minus every secret-named variable (nothing
    it runs downloads, so it needs none, and a process without a secret cannot leak it into a log)."""
    return {**{k: v for k, v in os.environ.items() if not SECRET_NAME.search(k)}, **extra}


class JobError(RuntimeError):
    """A job request that cannot be met now (one already running, nothing to stop); one readable line."""


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
        """Seconds left at the pace of the last `window` logged steps; None before two steps are logged."""
        recent = self.steps[-window:]
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


class Child:
    """A training process leading its own process group: one this studio started, or one found again after a restart.

    Signals go to the whole group (as Ctrl-C in a terminal does), so workers it started stop with it. A process
    found again is recognised by its pid and start time, so a recycled pid is never mistaken for it.
    """

    def __init__(self, pid: int, popen: subprocess.Popen | None = None, create_time: float | None = None):
        self.pid = pid
        self._popen = popen
        self.create_time = create_time if create_time is not None else _create_time(pid)
        self._gone = False

    @classmethod
    def gone(cls, pid: int | None) -> Child:
        """A recorded process that no longer runs (its Job only settles the outcome from the run folder)."""
        child = cls(pid or 0, create_time=0.0)
        child._gone = True
        return child

    @classmethod
    def find(cls, pid: int | None, create_time: float | None) -> Child | None:
        """The recorded process if it still runs (same pid, same start time, not a zombie), else None."""
        if pid is None or create_time is None or _create_time(pid) != create_time:
            return None
        child = cls(pid, create_time=create_time)
        return child if child.running() else None

    def running(self) -> bool:
        if self._gone:
            return False
        if self._popen is not None:
            return self._popen.poll() is None
        try:
            process = psutil.Process(self.pid)
            return _rounded(process.create_time()) == self.create_time and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    @property
    def returncode(self) -> int | None:
        """The exit code; None while it runs, and for a process found again (its exit code went to its parent)."""
        return self._popen.poll() if self._popen is not None else None

    def signal(self, sig: int) -> None:
        if self._gone or self.pid <= 0:  # never killpg(0): that is the caller's own group
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group has gone already

    def group(self) -> list[int]:
        """The live (non-zombie) processes of its group."""
        members = []
        for process in psutil.process_iter(["status"]):
            try:
                if os.getpgid(process.pid) == self.pid and process.info["status"] != psutil.STATUS_ZOMBIE:
                    members.append(process.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        return members

    def wait(self, timeout: float) -> bool:
        """Wait until the process has ended; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S / 2)
        return True


def _rounded(seconds: float) -> float:
    return round(seconds, 2)


def _create_time(pid: int) -> float | None:
    try:
        return _rounded(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def gpu_processes() -> set[int] | None:
    """Pids holding memory on an NVIDIA GPU (nvidia-smi, argv list); None when there is no such GPU to ask."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {int(word) for word in out.split() if word.strip().isdigit()}


class Job:
    """One child process training into one run folder, with the thread that follows it.

    The child writes its output straight into the log file (not a pipe), so it outlives a crashed studio and a
    restarted one can follow it again; every change of state is written to the run store through `save`.
    """

    def __init__(self, state: JobState, child: Child, stop_grace_s: float, term_grace_s: float,
                 save: Callable[[JobState], None], attached: bool = False):
        self.state = state
        self._child = child
        self._grace = (stop_grace_s, term_grace_s)
        self._save = save
        self._lock = threading.Lock()
        self._metrics = MetricsReader(Path(state.run_dir) / "metrics.jsonl")
        self._log: deque[str] = deque(maxlen=LOG_LINES)
        self._line = ""  # the output line still being written (tqdm redraws it with \r)
        self._log_offset = max(0, _size(Path(state.log_path)) - LOG_TAIL_BYTES) if attached else 0
        self._version = 0
        self._saved_at = 0.0
        self._stop_requested = state.status == "stopping"
        self._stopped = threading.Event()  # the stop ladder has finished, memory check included
        self._escalating = False
        self._store()
        threading.Thread(target=self._follow, daemon=True, name="gnlorp-job-follow").start()
        if attached and self._stop_requested and child.running():  # the last studio died while stopping it
            threading.Thread(target=self._escalate, daemon=True, name="gnlorp-job-stop").start()

    def snapshot(self) -> Snapshot:
        with self._lock:
            records = list(self._metrics.records)
            log = [*self._log, self._line] if self._line else list(self._log)
            return Snapshot(replace(self.state), [r for r in records if "loss" in r],
                            [r for r in records if "eval_loss" in r], log, self._version)

    def stop(self) -> None:
        """Start the stop ladder (see `_escalate`) in the background; returns at once."""
        with self._lock:
            if self.state.status not in ACTIVE:
                raise JobError(f"the run in {self.state.run_dir} has already ended ({self.state.status})")
            if self._stop_requested:
                return
            self._stop_requested = True
            self.state.status = "stopping"
            self._version += 1
        self._store()
        threading.Thread(target=self._escalate, daemon=True, name="gnlorp-job-stop").start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended and been read to the end; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.snapshot().active:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(POLL_S / 2)
        return True

    def _escalate(self) -> None:
        self._escalating = True
        try:
            self._climb()
        finally:
            self._stopped.set()

    def _climb(self) -> None:
        """Stop-and-save at the next step (SIGINT), cancel (a second SIGINT: no checkpoint), terminate the
        process group, kill it; then check that no process of the group, and no GPU memory of theirs, is left."""
        stop_grace, term_grace = self._grace
        members = set(self._child.group()) | {self._child.pid}
        for stage, sig, grace in (("save", signal.SIGINT, stop_grace), ("cancel", signal.SIGINT, term_grace),
                                  ("terminate", signal.SIGTERM, term_grace), ("kill", signal.SIGKILL, term_grace)):
            if not self._child.running():
                break
            with self._lock:
                self.state.stop_stage = stage
            self._child.signal(sig)
            if self._child.wait(grace):
                break
        deadline = time.monotonic() + term_grace
        while self._child.group() and time.monotonic() < deadline:
            self._child.signal(signal.SIGKILL)  # workers left behind by a leader that has exited
            time.sleep(POLL_S)
        holders = gpu_processes()
        with self._lock:
            self.state.memory_freed = not self._child.group() and (holders is None or not members & holders)

    def _take_output(self, text: str) -> None:
        with self._lock:
            pieces = (self._line + text.replace("\r\n", "\n")).split("\n")
            for piece in pieces[:-1]:
                shown = [part for part in piece.split("\r") if part.strip()]
                if shown:
                    self._log.append(redact(shown[-1]))
            last = [part for part in pieces[-1].split("\r") if part.strip()]
            self._line = redact(last[-1]) if last else ""
            self._version += 1

    def _read_log(self) -> None:
        """Take in what the child has appended to its log file since the last read."""
        path = Path(self.state.log_path)
        if _size(path) <= self._log_offset:
            return
        with open(path, "rb") as handle:
            handle.seek(self._log_offset)
            chunk = handle.read()
        self._log_offset += len(chunk)
        self._take_output(chunk.decode("utf-8", errors="replace"))

    def _follow(self) -> None:
        """Poll the log and metrics until the child exits, then read everything once more and settle the status."""
        while self._child.running():
            self._read_log()
            self._read_metrics()
            self._store(throttle=True)
            time.sleep(POLL_S)
        self._read_log()
        if self._stop_requested and self._escalating:
            self._stopped.wait(timeout=self._grace[1] + 10)
        with self._lock:
            if self._line.strip():
                self._log.append(self._line)
            self._line = ""
        self._read_metrics()
        returncode = self._child.returncode
        status, error = self._outcome(returncode)
        with self._lock:
            self.state.status, self.state.error = status, error
            self.state.returncode, self.state.ended_at = returncode, time.time()
            self._version += 1
        self._store()

    def _store(self, throttle: bool = False) -> None:
        """Write the state to the run store: at once on a change of status, else at most every STORE_EVERY_S."""
        if throttle and time.monotonic() - self._saved_at < STORE_EVERY_S:
            return
        self._saved_at = time.monotonic()
        with self._lock:
            state = replace(self.state)
        self._save(state)

    def _read_metrics(self) -> None:
        with self._lock:
            changed = self._metrics.read()
            steps = [r["step"] for r in self._metrics.records if "loss" in r]
            self.state.step = steps[-1] if steps else 0
            if changed:
                self._version += 1
            started = changed and self.state.status == "starting"
            if started:
                self.state.status = "running"
        if started:
            self._store()

    def _outcome(self, returncode: int | None) -> tuple[str, str | None]:
        """(final status, readable error or None) from the exit code, the summary and the output's error line.

        A run followed again after a restart has no exit code: its summary (written only at a clean end) decides.
        """
        summary = Path(self.state.run_dir) / "summary.json"
        if returncode == 0 or (returncode is None and summary.is_file()):
            status = json.loads(summary.read_text(encoding="utf-8")).get("status") if summary.is_file() else None
            return (status if status in ("finished", "stopped") else "finished"), None
        with self._lock:
            lines = list(self._log)
        reported = [m.group(1) for m in map(ERROR_LINE.match, lines) if m]
        if reported:
            return "failed", reported[-1]
        if self._stop_requested:
            return "stopped", (f"the run did not stop at a step boundary in time and was ended by force "
                               f"({self.state.stop_stage}); its last checkpoint (if any) is kept in "
                               f"{self.state.run_dir}")
        if returncode is None:
            return "failed", (f"the training process ended while the studio was not following it, without a "
                              f"summary; resume {Path(self.state.run_dir).name} from its last checkpoint")
        if returncode < 0:
            name = signal.Signals(-returncode).name
            hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
            return "failed", f"the training process was killed by {name}{hint}; its output is in {self.state.log_path}"
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        return "failed", (f"the training process exited with code {returncode} ({last.strip()[:200]}); "
                          f"its output is in {self.state.log_path}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class TryResult:
    """How a `gnlorp try` child ended: what it said it loaded, and its error in one line (None when it answered)."""

    description: str | None
    error: str | None
    stopped: bool


class TryChild:
    """A short `gnlorp try` child: its stdout is streamed by one caller, its stderr kept in a file to report from.

    It holds nothing worth saving, so stopping it terminates at once (then kills). It counts as a job: while it
    lives no training starts, and while a training runs none starts (see JobManager.start_try).
    """

    PREFIX = "gnlorp try: "

    def __init__(self, process: subprocess.Popen, stderr_path: Path, owner: str | None, term_grace_s: float):
        self.owner = owner  # who may stop it (a page's session), None for anyone
        self.stderr_path = stderr_path
        self._process = process
        self._grace = term_grace_s
        self._stopped = False

    @property
    def active(self) -> bool:
        return self._process.poll() is None

    def chunks(self) -> Iterator[bytes]:
        """The child's stdout as it is written, until it exits or is stopped."""
        assert self._process.stdout is not None
        yield from iter(lambda: self._process.stdout.read1(65536), b"")

    def stop(self) -> None:
        """End the child now if it still runs: terminate, then kill after the grace period."""
        if self._process.poll() is not None:
            return
        self._stopped = True
        self._process.terminate()
        try:
            self._process.wait(timeout=self._grace)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def finish(self) -> TryResult:
        """Wait for the child to exit; what it loaded and, unless it answered, why not, in one line."""
        returncode = self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        lines = self.stderr_path.read_text(encoding="utf-8", errors="replace").splitlines()
        said = [line.removeprefix(self.PREFIX) for line in lines
                if line.startswith(self.PREFIX) and not ERROR_LINE.match(line)]
        description = said[-1] if said else None
        if returncode == 0:
            return TryResult(description, None, False)
        reported = [m.group(1) for m in map(ERROR_LINE.match, lines) if m]
        if reported:
            return TryResult(description, reported[-1], False)
        if self._stopped:
            return TryResult(description, "stopped before it finished", True)
        if returncode < 0:
            name = signal.Signals(-returncode).name
            hint = " (the system may have run out of memory)" if name == "SIGKILL" else ""
            return TryResult(description, f"the model process was killed by {name}{hint}", False)
        last = next((line for line in reversed(lines) if line.strip()), "no output")
        return TryResult(description, f"the model process exited with code {returncode} ({last.strip()[:200]}); "
                                      f"its output is in {self.stderr_path}", False)


class JobManager:
    """Starts, follows and stops training jobs under one runs folder, one at a time.

    Each job's state lives in the run store (.studio/jobs/RUN.json, written atomically). A new manager
    reconciles it with the live processes: a run still going is followed again (and can be stopped), a run
    that died while no studio watched is marked failed (its checkpoints keep it resumable).
    """

    def __init__(self, runs_dir: str | os.PathLike, *, python: str = sys.executable,
                 stop_grace_s: float = 120.0, term_grace_s: float = 15.0, cwd: str | os.PathLike | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.python = python
        self.cwd = Path(cwd).resolve() if cwd is not None else Path.cwd()
        self._grace = (stop_grace_s, term_grace_s)
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._try: TryChild | None = None
        self._reconcile()

    @property
    def studio_dir(self) -> Path:
        """The studio's own files (configs it hands to runs, their logs), kept out of the runs list."""
        return self.runs_dir / ".studio"

    @property
    def store_dir(self) -> Path:
        return self.studio_dir / "jobs"

    def current(self) -> Job | None:
        """The running job (also one found again after a restart), or the last one started in this session."""
        return self._job

    def stored(self) -> list[JobState]:
        """Every job in the run store, newest first (unreadable entries are left out)."""
        states = []
        for path in self.store_dir.glob("*.json"):
            try:
                states.append(JobState.from_dict(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(states, key=lambda s: s.started_at, reverse=True)

    def _save(self, state: JobState) -> None:
        write_text_atomic(self.store_dir / f"{Path(state.run_dir).name}.json",
                          redact(json.dumps(state.to_dict(), indent=1)))

    def _reconcile(self) -> None:
        """Follow the live run again; settle the ones that ended while no studio was watching."""
        for state in self.stored():
            if state.status not in ACTIVE:
                continue
            child = Child.find(state.pid, state.create_time)
            if child is not None and (self._job is None or not self._job.snapshot().active):
                self._job = Job(state, child, *self._grace, save=self._save, attached=True)
            elif child is None:  # follow it to its end once, from its summary and log, and store the outcome
                Job(state, Child.gone(state.pid), *self._grace, save=self._save, attached=True)

    def start(self, cfg: RunConfig, predicted_peak_bytes: int | None = None) -> Job:
        """Train `cfg` into the new run folder `cfg.output` (which must not hold anything yet)."""
        cfg = cfg.validate()
        run_dir = Path(cfg.output).resolve()
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ConfigError(f"run folder {run_dir} already exists; choose another run name")
        config_path = self.studio_dir / "configs" / f"{run_dir.name}.yaml"
        cfg.to_yaml(config_path)
        command = [self.python, "-m", "gnlorp", "train", "--config", str(config_path), "--output", str(run_dir)]
        return self._launch(command, run_dir, cfg.max_steps, predicted_peak_bytes, config_hash(cfg))

    def resume(self, run_dir: str | os.PathLike, max_steps: int | None = None,
               predicted_peak_bytes: int | None = None) -> Job:
        """Continue a run folder from its latest checkpoint, optionally to a new step count."""
        run_dir = Path(run_dir).resolve()
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no config.yaml); pick a run from the runs table")
        if not any((run_dir / "checkpoints").glob("step-*")):
            raise ConfigError(f"{run_dir.name} has no checkpoint to resume from; start a new run instead")
        cfg = RunConfig.from_yaml(config)
        steps = cfg.max_steps
        command = [self.python, "-m", "gnlorp", "train", "--resume", "--output", str(run_dir)]
        if max_steps is not None and max_steps != steps:
            command += ["--max-steps", str(max_steps)]
            steps = max_steps
        return self._launch(command, run_dir, steps, predicted_peak_bytes, config_hash(cfg))

    def stop(self) -> Job:
        """Stop the running job (save at the next step boundary, escalating if needed); returns at once."""
        job = self._job
        if job is None or not job.snapshot().active:
            raise JobError("no training is running; nothing to stop")
        job.stop()
        return job

    def start_try(self, args: list[str], owner: str | None = None) -> TryChild:
        """Run `gnlorp try ARGS` in a child whose stdout the caller streams.

        Refused while a training runs or another try does, so a large model never competes with a run (or
        another model) for memory; `owner` names who may stop it with stop_try.
        """
        with self._lock:
            running = self._job.snapshot() if self._job is not None else None
            if running is not None and running.active:
                raise JobError(f"a training run is going ({Path(running.state.run_dir).name}, step {running.step}/"
                               f"{running.state.max_steps}); try the model when it ends, or stop it first")
            if self._try is not None and self._try.active:
                raise JobError("another model is being tried; wait for its answer or stop it")
            stderr_path = self.studio_dir / "logs" / "try.log"
            stderr_path.parent.mkdir(parents=True, exist_ok=True)
            with open(stderr_path, "wb") as stderr:
                process = subprocess.Popen([self.python, "-m", "gnlorp", "try", *args], cwd=self.cwd, env=child_env(),
                                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
            self._try = TryChild(process, stderr_path, owner, self._grace[1])
            return self._try

    def stop_try(self, owner: str | None = None) -> bool:
        """End the running try (only if `owner` started it, when given); False when there was none to end."""
        child = self._try
        if child is None or not child.active or (owner is not None and child.owner not in (owner, None)):
            return False
        child.stop()
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop a running job and wait for it, so closing the studio leaves no training process behind."""
        self.stop_try()
        job = self._job
        if job is not None and job.snapshot().active:
            job.stop()
            job.wait(timeout)

    def _launch(self, command: list[str], run_dir: Path, max_steps: int, predicted: int | None,
                config_sha256: str) -> Job:
        with self._lock:
            if self._job is not None:
                running = self._job.snapshot()
                if running.active:
                    raise JobError(f"a training run is already going ({Path(running.state.run_dir).name}, step "
                                   f"{running.step}/{running.state.max_steps}); stop it or wait until it ends")
            if self._try is not None and self._try.active:
                raise JobError("a model is being tried; train when its answer is done, or stop it first")
            log_path = self.studio_dir / "logs" / f"{run_dir.name}.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            env = child_env(PYTHONUNBUFFERED="1")  # its lines reach the log as they are printed
            # Its own session and process group: signals reach all of it, and it outlives a crashed studio,
            # writing straight into its log file, so a restarted studio can follow and stop it.
            with open(log_path, "ab") as log:
                process = subprocess.Popen(command, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            child = Child(process.pid, process)
            state = JobState(str(run_dir), command, max_steps, str(log_path), pid=process.pid,
                             predicted_peak_bytes=predicted, create_time=child.create_time,
                             config_sha256=config_sha256)
            self._job = Job(state, child, *self._grace, save=self._save)
            return self._job


@dataclass
class RunRecord:
    """A run folder as the runs table shows it: its config, its summary (once it ended) and its metrics."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def exportable(self) -> bool:
        return (self.path / "final" / "model.safetensors").is_file()


def list_runs(runs_dir: str | os.PathLike) -> list[RunRecord]:
    """Every run folder (one holding config.yaml) directly under `runs_dir`, newest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        config = path / "config.yaml"
        if path.name.startswith(".") or not config.is_file():
            continue
        try:
            loaded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
            summary_path = path / "summary.json"
            summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        except (OSError, ValueError, yaml.YAMLError):
            continue  # a folder being written or damaged is left out rather than breaking the table
        found.append(RunRecord(path, loaded if isinstance(loaded, dict) else {}, summary, read_metrics(path)))
    return sorted(found, key=lambda r: r.path.stat().st_mtime, reverse=True)
