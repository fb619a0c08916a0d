"""`gnlorp try` children for the studio: a short model process whose answer one caller streams.

JobManager.start_try starts one (never alongside a training run); this is how it is read, stopped and how
its ending is told in one line. Nothing here imports torch or gradio.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .child import ERROR_LINE


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
