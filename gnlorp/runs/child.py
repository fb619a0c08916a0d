"""Child processes of the CLI, and keeping secrets out of what the studio shows.

A training run or a try is a child process running `python -m gnlorp`; this is how the studio starts it
(with an environment stripped of secrets), finds it again after a restart, signals its process group and
waits for it, and redacts secret values from every log line, error and stored state it shows or writes.
Nothing here imports torch or gradio.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import psutil

ERROR_LINE = re.compile(r"^gnlorp(?: \w+)?: error: (.+)$")
POLL_S = 0.2
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


class Child:
    """A training process leading its own process group: one this studio started, or one found again after a restart.

    Signals go to the whole group (as Ctrl-C in a terminal does), so workers it started stop with it. torchrun
    starts its workers in sessions of their own and answers SIGINT by terminating them, so a SIGINT (stop and
    save) goes to those workers' groups alone, and harder signals to every group. A process found again is
    recognised by its pid and start time, so a recycled pid is never mistaken for it.
    """

    def __init__(self, pid: int, popen: subprocess.Popen | None = None, create_time: float | None = None):
        self.pid = pid
        self._popen = popen
        self.create_time = create_time if create_time is not None else _create_time(pid)
        self._gone = False
        self._worker_groups: set[int] = set()  # groups led by descendants in sessions of their own (torchrun's)

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
        workers = self._workers()
        for group in workers if sig == signal.SIGINT and workers else {self.pid, *workers}:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass  # the group has gone already

    def _workers(self) -> set[int]:
        """The groups of descendants that lead sessions of their own, remembered once seen (they outlive torchrun
        when it is killed)."""
        try:
            for process in psutil.Process(self.pid).children(recursive=True):
                if os.getpgid(process.pid) == process.pid:
                    self._worker_groups.add(process.pid)
        except (ProcessLookupError, psutil.Error):
            pass
        return self._worker_groups

    def group(self) -> list[int]:
        """The live (non-zombie) processes of its group and of its workers' groups."""
        groups = {self.pid, *self._workers()}
        members = []
        for process in psutil.process_iter(["status"]):
            try:
                if os.getpgid(process.pid) in groups and process.info["status"] != psutil.STATUS_ZOMBIE:
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
