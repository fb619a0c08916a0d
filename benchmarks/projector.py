"""Projector options at scale: staggered refreshes (step time, transient memory) and int8 projectors (bytes, loss).

stagger: the 2-D weights of a LLaMA-130m-sized stack (per layer q, k, v, o 768×768, gate, up 2048×768,
down 768×2048), fixed gradients, ProjectedAdamW with and without `stagger_refresh`, stepped alternately in
one process so both see the same machine load. Per step: wall time and the transient memory of the step
(peak RSS while it runs minus RSS before it; glibc's mmap threshold is pinned so freed tensors leave the
RSS). Wall time and the main thread's CPU time are both kept: CPU time holds up on a loaded machine.
Step 0 (every matrix takes its first SVD in both modes) is reported apart from the later steps.

proj-dtype: `python -m gnlorp train` on presets/tiny-gradnormlorp.yaml (fortunes, 200 steps, 8-bit states)
with bfloat16 and int8 projectors, per seed: optimizer state bytes measured and predicted, final eval loss.

Run:  python benchmarks/projector.py stagger [--layers 12 --rank 128 --gap 10 --steps 30]
      python benchmarks/projector.py proj-dtype [--seeds 0 1 --max-steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

LAYER_SHAPES = [(768, 768)] * 4 + [(2048, 768), (2048, 768), (768, 2048)]
ROOT = Path(__file__).resolve().parent.parent


class PeakRSS:
    """Peak resident set size between start() and stop(), sampled every millisecond by a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._running = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def start(self) -> int:
        self.peak = before = self.process.memory_info().rss
        self._running.set()
        return before

    def stop(self) -> int:
        self._running.clear()
        return max(self.peak, self.process.memory_info().rss)

    def _sample(self) -> None:
        while True:
            if self._running.is_set():
                self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def stagger(args: argparse.Namespace) -> dict:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # must be set before the process starts
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        return json.loads(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--json-only"], env=env,
                                         check=True, capture_output=True, text=True).stdout)
    import torch

    from gnlorp.optim import ProjectedAdamW

    gen = torch.Generator().manual_seed(0)
    shapes = LAYER_SHAPES * args.layers
    runs = {}
    for mode in ("off", "on"):
        weights = [torch.nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in shapes]
        for w in weights:
            w.grad = torch.randn(*w.shape, generator=gen) * 1e-3
        group = {"params": weights, "rank": args.rank, "update_proj_gap": args.gap, "stagger_refresh": mode == "on"}
        runs[mode] = {"opt": ProjectedAdamW([group], bits=8, lr=1e-3), "ms": [], "cpu_ms": [], "transient": []}
    sampler = PeakRSS()
    for _ in range(args.steps + 1):
        for run in runs.values():
            before = sampler.start()
            tick, cpu_tick = time.perf_counter(), time.thread_time()
            run["opt"].step()
            run["ms"].append(1000 * (time.perf_counter() - tick))
            run["cpu_ms"].append(1000 * (time.thread_time() - cpu_tick))
            run["transient"].append(sampler.stop() - before)
    result = {"matrices": len(shapes), "rank": args.rank, "gap": args.gap, "steps": args.steps}
    for mode, run in runs.items():
        later, cpu, transient = run["ms"][1:], run["cpu_ms"][1:], run["transient"][1:]
        result[f"stagger_{mode}"] = {
            "step0_ms": run["ms"][0], "p50_ms": percentile(later, 50), "p99_ms": percentile(later, 99),
            "max_ms": max(later), "mean_ms": statistics.mean(later),
            "cpu_p50_ms": percentile(cpu, 50), "cpu_p99_ms": percentile(cpu, 99), "cpu_max_ms": max(cpu),
            "step0_transient_mib": run["transient"][0] / 2**20, "max_transient_mib": max(transient) / 2**20,
        }
    return result


def proj_dtype(args: argparse.Namespace) -> dict:
    rows = []
    for seed in args.seeds:
        for dtype in ("bfloat16", "int8"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "run"
                cmd = [sys.executable, "-m", "gnlorp", "train", "--config", "presets/tiny-gradnormlorp.yaml",
                       "--proj-dtype", dtype, "--seed", str(seed), "--max-steps", str(args.max_steps),
                       "--output", str(out)]
                subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
                summary = json.loads((out / "summary.json").read_text())
                evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                eval_loss = [r["eval_loss"] for r in evals if "eval_loss" in r][-1]
            rows.append({"seed": seed, "proj_dtype": dtype, "eval_loss": eval_loss,
                         "state_bytes": summary["optimizer_state_bytes"],
                         "predicted_state_bytes": summary["predicted_optimizer_state_bytes"]})
    return {"max_steps": args.max_steps, "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    st = commands.add_parser("stagger")
    st.add_argument("--layers", type=int, default=12, help="transformer layers (12 = LLaMA-130m)")
    st.add_argument("--rank", type=int, default=128)
    st.add_argument("--gap", type=int, default=10, help="update_proj_gap")
    st.add_argument("--steps", type=int, default=30, help="steps after step 0")
    st.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    pd = commands.add_parser("proj-dtype")
    pd.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    pd.add_argument("--max-steps", type=int, default=200)
    args = parser.parse_args()
    result = stagger(args) if args.command == "stagger" else proj_dtype(args)
    if not getattr(args, "json_only", False):
        result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
