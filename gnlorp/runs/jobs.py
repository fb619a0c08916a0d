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
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..atomic import strict_json, write_text_atomic
from ..checkpoint import checkpoints, config_hash, refuse_if_finished
from ..config import ConfigError, RunConfig
from .child import ERROR_LINE, POLL_S, Child, child_env, gpu_processes, redact
from .store import ACTIVE, JobState, MetricsReader, Snapshot, read_job_states, studio_dir
from .try_jobs import TryChild

LOG_LINES = 400
LOG_TAIL_BYTES = 1 << 18  # how much of a log a restarted studio reads back to show
STORE_EVERY_S = 2.0  # the run store gets the step at most this often (and every change of status at once)


class JobError(RuntimeError):
    """A job request that cannot be met now (one already running, nothing to stop); one readable line."""


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
        return studio_dir(self.runs_dir)

    @property
    def store_dir(self) -> Path:
        return self.studio_dir / "jobs"

    def current(self) -> Job | None:
        """The running job (also one found again after a restart), or the last one started in this session."""
        return self._job

    def stored(self) -> list[JobState]:
        """Every job in the run store, newest first (unreadable entries are left out)."""
        return read_job_states(self.store_dir)

    def _save(self, state: JobState) -> None:
        write_text_atomic(self.store_dir / f"{Path(state.run_dir).name}.json",
                          redact(strict_json(state.to_dict(), indent=1)))

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

    def start(self, cfg: RunConfig, predicted_peak_bytes: int | None = None, gpus: int = 1) -> Job:
        """Train `cfg` into the new run folder `cfg.output` (which must not hold anything yet), in one process or,
        with `gpus` > 1, in that many started by torchrun (data-parallel, or sharded with cfg.fsdp)."""
        cfg = cfg.validate()
        run_dir = Path(cfg.output).resolve()
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ConfigError(f"run folder {run_dir} already exists; choose another run name")
        config_path = self.studio_dir / "configs" / f"{run_dir.name}.yaml"
        cfg.to_yaml(config_path)
        command = [*self._runner(gpus), "train", "--config", str(config_path), "--output", str(run_dir)]
        return self._launch(command, run_dir, cfg.max_steps, predicted_peak_bytes, config_hash(cfg))

    def resume(self, run_dir: str | os.PathLike, max_steps: int | None = None,
               predicted_peak_bytes: int | None = None) -> Job:
        """Continue a run folder from its latest checkpoint, optionally to a new step count."""
        run_dir = Path(run_dir).resolve()
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise ConfigError(f"{run_dir} is not a run folder (no config.yaml); pick a run from the runs table")
        if not checkpoints(run_dir):
            raise ConfigError(f"{run_dir.name} has no checkpoint to resume from; start a new run instead")
        cfg = RunConfig.from_yaml(config)
        steps = cfg.max_steps if max_steps is None else max_steps
        refuse_if_finished(run_dir, steps)  # before a child is started that would only say the same
        command = [*self._runner(saved_world_size(run_dir)), "train", "--resume", "--output", str(run_dir)]
        command += ["--max-steps", str(steps)] if steps != cfg.max_steps else []
        return self._launch(command, run_dir, steps, predicted_peak_bytes, config_hash(cfg))

    def _runner(self, processes: int) -> list[str]:
        """`python -m gnlorp`, or torchrun starting `processes` of it on this machine (--standalone: a free port)."""
        if processes <= 1:
            return [self.python, "-m", "gnlorp"]
        return [self.python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                "-m", "gnlorp"]

    def stop(self) -> Job:
        """Stop the running job (save at the next step boundary, escalating if needed); returns at once."""
        job = self._job
        if job is None or not job.snapshot().active:
            raise JobError("no training is running; nothing to stop")
        job.stop()
        return job

    def start_try(self, args: list[str], owner: str | None = None, command: str = "try") -> TryChild:
        """Run `gnlorp try ARGS` (or another model command, such as eval) in a child whose stdout the caller streams.

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
                process = subprocess.Popen([self.python, "-m", "gnlorp", command, *args], cwd=self.cwd, env=child_env(),
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


def saved_world_size(run_dir: Path) -> int:
    """How many processes wrote the run's newest checkpoint (1 for one written before this was recorded)."""
    newest = next(iter(checkpoints(run_dir)), None)
    try:
        return int(json.loads((newest / "trainer_state.json").read_text(encoding="utf-8")).get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1
