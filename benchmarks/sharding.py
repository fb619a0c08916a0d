"""Sharded training (--fsdp): what the projected optimizer communicates, on paper and measured, and what it costs.

1. On paper, from the model's config alone: per step and per refresh, the payload each rank's optimizer sends or
   receives (projector gathers; on the left side R's all-reduce and N's all-gather; at a refresh, the matrix
   gathered on its owner and the basis broadcast), beside what FSDP itself moves per step (weights gathered in
   forward and backward in bf16, gradients reduce-scattered in fp32), for LLaMA-7B and Llama-3-70B.
2. Measured on this CPU: two gloo processes step ProjectedAdamW on one decoder layer's matrices of llama-130m;
   every collective is counted (the closed form must match it), and the time of a step and of a refresh is set
   against one process stepping the whole matrices.
Run:  python benchmarks/sharding.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import add_output_arguments, machine, write_section

GB = 1e9
PAPER = [("llama-7b", 1024), ("llama3-70b", 2048)]
MEASURED_MODEL, MEASURED_RANK = "llama-130m", 128


def target_shapes(model: str) -> list[tuple[int, int]]:
    """The (m, n) of every matrix GaLore/GradNormLoRP projects (attention and MLP linears), from the config."""
    from gnlorp.config import RunConfig
    from gnlorp.methods.base import resolve_targets
    from gnlorp.models.load import meta_model

    base = meta_model(model, "causal-lm")
    return [tuple(base.get_submodule(name).weight.shape) for name in resolve_targets(base, RunConfig(model=model))]


def optimizer_payload(shapes: list[tuple[int, int]], rank: int, world: int, proj_type: str,
                      proj_bytes: int = 2) -> dict[str, float]:
    """Bytes rank 0's optimizer receives per step, and over one refresh of every matrix.

    Per step: the projector gathered whole in its stored form (N-1 slices of `proj_bytes` values arrive); on the
    left side also R all-reduced (fp32; a ring moves 2(N-1)/N of it through each rank) and N all-gathered (fp32).
    Per refresh: a matrix's owner (round-robin, rank 0 the first) receives the other ranks' rows (fp32); every
    other rank receives its slice of the basis (fp32).
    """
    from gnlorp.optim.projector import projection_side
    from gnlorp.optim.sharded import slice_numel

    step = refresh = 0.0
    share = (world - 1) / world
    for index, (m, n) in enumerate(shapes):
        r = min(rank, m, n)
        side = projection_side(torch.Size((m, n)), proj_type)
        basis = r * (n if side == "right" else m)
        piece = slice_numel(basis, world)
        step += proj_bytes * (world - 1) * piece
        if side == "left":
            step += 4 * r * n * 2 * share + 4 * (world - 1) * slice_numel(r * n, world)
        refresh += 4 * (world - 1) * -(-m // world) * n if index % world == 0 else 4 * piece
    return {"step": step, "refresh": refresh}


def fsdp_payload(params: int, trainable: int, world: int) -> float:
    """What FSDP itself moves per step and rank: weights all-gathered in forward and backward (bf16), gradients
    reduce-scattered (fp32)."""
    share = (world - 1) / world
    return share * (2 * 2 * params + 4 * trainable)


def paper_table() -> str:
    from gnlorp.config import RunConfig
    from gnlorp.memory.estimate import _shapes

    lines = ["| Model, rank | GPUs | optimizer per step, std (GB) | right (GB) | one refresh of all, std (GB) | "
             "FSDP per step (GB) | optimizer / FSDP, std |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, rank in PAPER:
        shapes = target_shapes(model)
        _, counts = _shapes(RunConfig(model=model, method="gradnormlorp", rank=rank))
        for world in (8, 16, 64):
            std = optimizer_payload(shapes, rank, world, "std")
            right = optimizer_payload(shapes, rank, world, "right")
            own = fsdp_payload(counts.params, counts.trainable, world)
            lines.append(f"| {model}, r={rank} | {world} | {std['step'] / GB:.2f} | {right['step'] / GB:.2f} | "
                         f"{std['refresh'] / GB:.2f} | {own / GB:.1f} | {std['step'] / own:.1%} |")
    return "\n".join(lines)


class Counter:
    """Wraps torch.distributed's collectives to add up the payload each one carries on this rank."""

    def __init__(self):
        self.bytes = 0.0
        self._originals = {}

    def __enter__(self):
        world, me = dist.get_world_size(), dist.get_rank()

        def size(t):
            return t.numel() * t.element_size()

        counts = {
            "all_reduce": lambda t, *a, **k: size(t) * 2 * (world - 1) / world,  # as one rank sees a ring
            "all_gather": lambda out, t, *a, **k: size(t) * (world - 1),
            "gather": lambda t, lst=None, *a, **k: size(t) * (world - 1) if lst is not None else 0,
            "broadcast": lambda t, *a, src=0, **k: 0 if me == src else size(t),
            "scatter": lambda t, lst=None, *a, **k: 0 if lst is not None else size(t),
        }
        for name, count in counts.items():
            original = getattr(dist, name)
            self._originals[name] = original

            def wrapped(*args, _original=original, _count=count, **kwargs):
                self.bytes += _count(*args, **kwargs)
                return _original(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _shards(shapes, world: int, steps: int, proj_type: str, init: str, out: str, rank_id: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gnlorp.optim import ProjectedAdamW

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank_id, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
    generator = torch.Generator().manual_seed(0)
    whole = [torch.randn(shape, generator=generator) for shape in shapes]
    params = [torch.nn.Parameter(distribute_tensor(w, mesh, [Shard(0)]) if world > 1 else w) for w in whole]
    optimizer = ProjectedAdamW([{"params": params, "rank": MEASURED_RANK, "update_proj_gap": 1 << 30,
                                 "proj_type": proj_type}], lr=1e-3, bits=8, fused=False)
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    for p, g in zip(params, grads, strict=True):
        p.grad = distribute_tensor(g, mesh, [Shard(0)]) if world > 1 else g
    times, sent = [], []
    for _ in range(steps + 1):  # step 0 refreshes every projector (the SVDs); the others only step
        counter = Counter().__enter__() if world > 1 else None
        tick = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - tick)
        if counter is not None:
            counter.__exit__()
            sent.append(counter.bytes)
    if rank_id == 0:
        torch.save({"refresh_s": times[0], "step_s": statistics.median(times[1:]),
                    "refresh_bytes": sent[0] if sent else 0.0,
                    "step_bytes": statistics.median(sent[1:]) if sent else 0.0}, out)
    if world > 1:
        dist.destroy_process_group()


def measured_table(steps: int) -> str:
    shapes = target_shapes(MEASURED_MODEL)
    per_layer = len(shapes) // 12  # llama-130m: 12 layers of 7 matrices
    shapes = shapes[:per_layer]
    lines = ["| Projection | processes | step (ms) | refresh step (ms) | step payload, rank 0 (MB): measured | "
             "closed form | refresh step payload (MB): measured | closed form |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        for proj_type in ("std", "right"):
            for world in (1, 2):
                out = str(Path(tmp) / f"{proj_type}-{world}.pt")
                args = (shapes, world, steps, proj_type, f"file://{tmp}/rdv-{proj_type}-{world}", out)
                if world == 1:
                    _shards(*args, 0)
                else:
                    mp.spawn(_spawned, args=args, nprocs=world)
                got = torch.load(out, weights_only=True)
                paper = optimizer_payload(shapes, MEASURED_RANK, world, proj_type) if world > 1 else None
                if paper is not None:  # the refresh step steps too
                    paper["refresh"] += paper["step"]
                lines.append(
                    f"| {proj_type} | {world} | {got['step_s'] * 1e3:.1f} | {got['refresh_s'] * 1e3:.0f} | "
                    + (f"{got['step_bytes'] / 1e6:.2f} | {paper['step'] / 1e6:.2f} | "
                       f"{got['refresh_bytes'] / 1e6:.2f} | {paper['refresh'] / 1e6:.2f} |" if paper else
                       "– | – | – | – |"))
    return "\n".join(lines)


def _spawned(rank_id: int, *args) -> None:
    _shards(*args, rank_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    steps = 3 if args.quick else 10
    markdown = "\n\n".join([
        f"Machine: {machine()}. Command: `python benchmarks/sharding.py{' --quick' if args.quick else ''}`.",
        "On paper (what rank 0 receives; 8-bit moments with bf16 projectors, every attention and MLP matrix "
        "projected at the rank given):",
        paper_table(),
        f"Measured: one decoder layer of {MEASURED_MODEL} (7 matrices), rank {MEASURED_RANK}, 8-bit moments, "
        f"median of {steps} steps after the refresh:",
        measured_table(steps),
    ])
    write_section(args.out, "sharding", markdown)


if __name__ == "__main__":
    main()
