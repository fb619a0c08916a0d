"""The studio's default run (presets/tiny-gradnormlorp.yaml, 200 steps) predicted against measured, by thread count.

The estimator's CPU overhead was first fitted on 3-step runs; a whole run's RSS keeps growing for about 20 steps
(and a little through its evaluations), and each extra intra-op thread holds a few MiB more. Each row trains the
preset in a fresh `python -m gnlorp train` process with OMP_NUM_THREADS set, and reads summary.json (the measured
peak: RSS above the pre-load baseline, sampled every 20 ms; the prediction, made from the config before training)
and metrics.jsonl (the step at which each new peak was reached).
Run:  python benchmarks/default_run_peak.py [--repeats 2] [--threads 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import add_output_arguments, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "tiny-gradnormlorp.yaml"
MIB = 2**20


def run(threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        done = subprocess.run([sys.executable, "-m", "gnlorp", "train", "--config", str(PRESET), "--output", str(out)],
                              capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"the default run failed at {threads} threads: {done.stderr.strip()}")
        summary = json.loads((out / "summary.json").read_text())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peaks = [(r["step"], r["peak_mem_bytes"]) for r in records if "peak_mem_bytes" in r]
    at_step = {n: max((peak for step, peak in peaks if step <= n), default=0) for n in (3, 20)}
    return {**summary, "threads": threads, "peak_at_3": at_step[3], "peak_at_20": at_step[20]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    add_output_arguments(parser)
    args = parser.parse_args()
    rows = ["| threads | peak by step 3 MiB | by step 20 | whole run (200 steps) | predicted | error |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for _ in range(args.repeats):
        for threads in args.threads:
            r = run(threads)
            error = r["predicted_peak_bytes"] / r["peak_mem_bytes"] - 1
            rows.append(f"| {threads} | {r['peak_at_3'] / MIB:.1f} | {r['peak_at_20'] / MIB:.1f} | "
                        f"{r['peak_mem_bytes'] / MIB:.1f} | {r['predicted_peak_bytes'] / MIB:.1f} | {error:+.1%} |")
    write_section(args.out, "default_run_peak", "\n".join([
        f"Machine: {machine()}. Command: `python benchmarks/default_run_peak.py --repeats {args.repeats}`.", "",
        *rows]))


if __name__ == "__main__":
    main()
