"""Studio benchmark: cold start (process start to first page served) and how fast the live charts follow a run.

    OMP_NUM_THREADS=1 python benchmarks/studio.py [--starts 3] [--steps 80]

Cold start: `python app.py` in a fresh process, timed until GET / answers 200; median of --starts runs.
Chart refresh: while the default preset trains (shortened), the page's own refresh callback (/refresh, what the
2-s-or-faster timer calls) is polled, once at the page's interval and once back to back; for every new step
that appears in the Loss chart, the delay is the time it arrived minus the `time` the run wrote in its
metrics.jsonl line. The round trip of one callback call is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launch(runs_dir: Path, timeout: float = 300) -> Iterator[tuple[str, float, float]]:
    """Start app.py; yield (url, wall seconds from process start to the first page served, CPU seconds the
    process had used by then); stop it afterwards. CPU time is what a busy shared machine cannot inflate."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs-dir", str(runs_dir)],
                               cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"app.py exited with {process.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"no page at {url} after {timeout} s")
            time.sleep(0.05)
        wall = time.perf_counter() - started
        cpu = psutil.Process(process.pid).cpu_times()
        yield url, wall, cpu.user + cpu.system
    finally:
        process.terminate()
        process.wait(timeout=60)


def cold_starts(count: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds to the first page, for `count` fresh studio processes."""
    times = []
    for _ in range(count):
        with tempfile.TemporaryDirectory() as tmp, launch(Path(tmp) / "runs") as (_, wall, cpu):
            times.append((wall, cpu))
    return times


def _form(client, endpoint: str, **by_label) -> list:
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][endpoint]["parameters"]
    return [by_label.get(p["label"], p["parameter_default"]) for p in params]


def follow(client, run_dir: Path, interval: float, seconds: float) -> tuple[list[float], list[float]]:
    """Poll /refresh every `interval` s for `seconds`; (delays of newly drawn steps, round trips of the calls)."""
    delays, trips, drawn = [], [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent = time.perf_counter()
        _, loss, _, _ = client.predict(api_name="/refresh")
        arrived = time.time()
        trips.append(time.perf_counter() - sent)
        if isinstance(loss, dict) and loss.get("type") == "plotly":
            steps = json.loads(loss["plot"])["data"][0]["x"]
            if len(steps) > drawn:
                logged = {r["step"]: r["time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                                             .splitlines()) if "loss" in r}
                delays += [arrived - logged[step] for step in steps[drawn:]]
                drawn = len(steps)
        time.sleep(max(0.0, interval - (time.perf_counter() - sent)))
    return delays, trips


def refresh_latency(steps: int) -> dict[str, dict[str, list[float]]]:
    from gradio_client import Client

    results = {}
    with tempfile.TemporaryDirectory() as tmp, launch(Path(tmp) / "runs") as (url, _, _):
        client = Client(url, verbose=False)
        for name, interval in (("page timer (1 s)", 1.0), ("back to back", 0.0)):
            message = client.predict(*_form(client, "/start", Steps=steps, **{"Batch size": 4,
                                     "Sequence length": 64}), api_name="/start")[0]
            assert "started" in message, message
            while (state := client.predict(api_name="/status"))["train_points"] < 1:
                time.sleep(0.2)
            delays, trips = follow(client, Path(state["run_dir"]), interval, seconds=20)
            results[name] = {"delays": delays, "trips": trips}
            client.predict(api_name="/stop")
            while client.predict(api_name="/status")["status"] in ("starting", "running", "stopping"):
                time.sleep(0.5)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    starts = cold_starts(args.starts)
    walls, cpus = [w for w, _ in starts], [c for _, c in starts]
    print(f"cold start to first page: median {statistics.median(walls):.1f} s wall, {statistics.median(cpus):.1f} s "
          f"CPU (runs: {', '.join(f'{w:.1f}/{c:.1f}' for w, c in starts)}); load average {os.getloadavg()[0]:.1f}")
    for name, result in refresh_latency(args.steps).items():
        delays, trips = result["delays"], result["trips"]
        print(f"chart refresh, {name}: new step to chart median {statistics.median(delays):.2f} s, "
              f"max {max(delays):.2f} s over {len(delays)} updates; callback round trip median "
              f"{1000 * statistics.median(trips):.0f} ms over {len(trips)} calls")


if __name__ == "__main__":
    main()
