"""State memory and step time of ProjectedAdamW beside torch AdamW, bitsandbytes AdamW8bit and galore-torch.

One weight of a LLaMA-7B shape at a time, every optimizer on the same weight and gradient in one run.
The first step of a projected optimizer takes the SVD, so it is reported apart from the median of the
ordinary steps. Run:  python benchmarks/optimizer.py [--quick] [--ranks 128 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from gnlorp.optim import ProjectedAdamW, state_bytes

FULL_SHAPES = [(4096, 4096), (4096, 11008)]
QUICK_SHAPES = [(512, 512), (512, 1376)]


@dataclass
class Result:
    optimizer: str
    shape: str
    rank: int | None
    state_bytes: int
    first_step_ms: float
    median_step_ms: float
    vs_adamw: float = 0.0


def galore_torch_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """galore-torch keeps its projector as an object in the state; count the tensor inside it too."""
    total = state_bytes(optimizer)
    for state in optimizer.state.values():
        projector = state.get("projector")
        if projector is not None and projector.ortho_matrix is not None:
            total += projector.ortho_matrix.numel() * projector.ortho_matrix.element_size()
    return total


def baselines() -> dict[str, tuple[Callable, Callable]]:
    """Full-rank optimizers: name -> (make optimizer for a parameter, count its state bytes)."""
    import bitsandbytes as bnb

    return {
        "torch AdamW fp32": (lambda p: torch.optim.AdamW([p], lr=1e-3), state_bytes),
        "bitsandbytes AdamW8bit": (lambda p: bnb.optim.AdamW8bit([p], lr=1e-3), state_bytes),
    }


def projected(rank: int) -> dict[str, tuple[Callable, Callable]]:
    """Rank-r optimizers, with a projection gap so long that only the first step takes an SVD."""
    from galore_torch import GaLoreAdamW

    def ours(bits: int, weight_norm: bool):
        return lambda p: ProjectedAdamW(
            [{"params": [p], "rank": rank, "update_proj_gap": 10**6, "weight_norm": weight_norm}], bits=bits
        )

    return {
        "galore-torch GaLoreAdamW": (
            lambda p: GaLoreAdamW(
                [{"params": [p], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25, "proj_type": "std"}],
                lr=1e-3, no_deprecation_warning=True,
            ),
            galore_torch_state_bytes,
        ),
        "gnlorp galore 32-bit": (ours(32, False), state_bytes),
        "gnlorp galore 8-bit": (ours(8, False), state_bytes),
        "gnlorp gradnormlorp 32-bit": (ours(32, True), state_bytes),
        "gnlorp gradnormlorp 8-bit": (ours(8, True), state_bytes),
    }


def measure(make: Callable, count: Callable, shape: tuple[int, int], steps: int) -> tuple[int, float, float]:
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape) * 0.02)
    param.grad = torch.randn(shape) * 1e-3
    optimizer = make(param)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
    return count(optimizer), times[0], statistics.median(times[1:])


def run(shapes: list[tuple[int, int]], ranks: list[int], steps: int) -> list[Result]:
    results = []
    for shape in shapes:
        label = f"{shape[0]}x{shape[1]}"
        for name, (make, count) in baselines().items():
            results.append(Result(name, label, None, *measure(make, count, shape, steps)))
        for rank in ranks:
            for name, (make, count) in projected(rank).items():
                results.append(Result(name, label, rank, *measure(make, count, shape, steps)))
    baseline = {r.shape: r.median_step_ms for r in results if r.optimizer == "torch AdamW fp32"}
    for r in results:
        r.vs_adamw = r.median_step_ms / baseline[r.shape]
    return results


def markdown(results: list[Result]) -> str:
    lines = [
        "| shape | optimizer | rank | state MiB | first step ms (SVD) | median step ms | × AdamW fp32 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.shape} | {r.optimizer} | {r.rank or '-'} | {r.state_bytes / 2**20:.2f} | {r.first_step_ms:.0f} "
            f"| {r.median_step_ms:.1f} | {r.vs_adamw:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    parser.add_argument("--ranks", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=7, help="ordinary steps after the first (median taken)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    ranks = [min(r, 64) for r in args.ranks] if args.quick else args.ranks
    results = run(shapes, sorted(set(ranks)), args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)


if __name__ == "__main__":
    main()
