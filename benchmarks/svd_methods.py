"""Exact against randomized refreshes (`--svd exact|randomized`): time per refresh and loss at equal steps.

1. Time: `svd_basis` on gradient-shaped matrices of LLaMA-130M and -350M (a decaying random spectrum), median of
   3, one thread and all threads; with the subspace's distance from the exact one and the energy each keeps.
2. Loss: `gnlorp train` on tiny (GradNormLoRP, rank 16, 8-bit, refresh every 25 steps), each method and seed in a
   fresh process; held-out loss at the end.
Run:  python benchmarks/svd_methods.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import add_output_arguments, machine, write_section

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [((768, 768), 128), ((2048, 768), 128), ((1024, 1024), 256), ((2736, 1024), 256)]


def spectrum_like(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A random matrix with a power-law spectrum σᵢ ∝ i^-1 (gradients' spectra decay about so)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=generator))
    return u @ torch.diag(1 / torch.arange(1, k + 1, dtype=torch.float32)) @ v.T


def timing_table(repeats: int) -> str:
    from gnlorp.optim.projector import svd_basis
    from gnlorp.optim.spectrum import energy_profile

    lines = ["| Shape, rank | threads | exact (ms) | randomized (ms) | speed-up | subspace distance | energy kept: "
             "exact | randomized |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for threads in (1, torch.get_num_threads()):
        torch.set_num_threads(threads)
        for shape, rank in SHAPES:
            matrix = spectrum_like(shape, 0)
            times = {}
            for method in ("exact", "randomized"):
                runs = []
                for _ in range(repeats):
                    tick = time.perf_counter()
                    basis, values, _ = svd_basis(matrix, rank, "right", method, seed=1)
                    runs.append(time.perf_counter() - tick)
                times[method] = (statistics.median(runs), basis, values)
            exact, randomized = times["exact"][1], times["randomized"][1]
            distance = float((exact.T @ exact - randomized.T @ randomized).norm() / (2 * rank) ** 0.5)
            total = float(matrix.norm()) ** 2
            kept = [energy_profile(times[m][2], rank, total)[0] for m in ("exact", "randomized")]
            lines.append(f"| {shape[0]}×{shape[1]}, r={rank} | {threads} | {times['exact'][0] * 1e3:.0f} | "
                         f"{times['randomized'][0] * 1e3:.0f} | {times['exact'][0] / times['randomized'][0]:.1f}× | "
                         f"{distance:.3f} | {kept[0]:.4f} | {kept[1]:.4f} |")
    return "\n".join(lines)


def loss_table(steps: int, seeds: list[int]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    lines = ["| Refresh | seed | held-out loss | wall (s) | refreshes |", "| --- | ---: | ---: | ---: | ---: |"]
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("exact", "randomized"):
            for seed in seeds:
                run = Path(tmp) / f"{method}-{seed}"
                command = [sys.executable, "-m", "gnlorp", "train", "--config", "presets/tiny-gradnormlorp.yaml",
                           "--max-steps", str(steps), "--update-proj-gap", "25", "--eval-every", str(steps),
                           "--seed", str(seed), "--svd", method, "--output", str(run)]
                tick = time.perf_counter()
                subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
                wall = time.perf_counter() - tick
                metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                loss = [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
                summary = json.loads((run / "summary.json").read_text())
                results.setdefault(method, []).append(loss)
                lines.append(f"| {method} | {seed} | {loss:.3f} | {wall:.0f} | {summary['projector_refreshes']} |")
    for method, losses in results.items():
        lines.append(f"| **{method}, median** | | **{statistics.median(losses):.3f}** | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    args = parser.parse_args()
    repeats, steps, seeds = (1, 50, [0]) if args.quick else (3, 200, [0, 1])
    markdown = "\n\n".join([
        f"Machine: {machine()}. Command: `python benchmarks/svd_methods.py{' --quick' if args.quick else ''}`.",
        "Time per refresh (`svd_basis`, right side; power-law spectrum σᵢ ∝ 1/i; distance = ‖QᵀQ − Q̃ᵀQ̃‖_F/√(2r), "
        "0 for the same subspace, 1 for orthogonal ones):",
        timing_table(repeats),
        f"Loss at equal steps (tiny, GradNormLoRP rank 16, 8-bit, {steps} steps, refresh every 25):",
        loss_table(steps, seeds),
    ])
    write_section(args.out, "svd_methods", markdown)


if __name__ == "__main__":
    main()
