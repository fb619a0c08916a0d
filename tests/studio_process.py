"""Start the studio (`python app.py`) in a subprocess on a free port, as a user would, for the UI tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
START_TIMEOUT_S = 180  # the test machine is shared; a cold start can take far longer than on a quiet laptop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def studio(runs_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run app.py with `runs_dir` (and `env` added to the environment) until the block ends; yields its URL once
    the page is served."""
    port = free_port()
    log = open(runs_dir.parent / f"studio-{port}.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs_dir), *extra],
                               cwd=ROOT, env={**ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the studio exited with {process.returncode}: {Path(log.name).read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the studio did not serve {url} within {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()  # the studio stops a running training (SIGINT, then harder) before it exits
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
