"""One optimizer step on one large bf16 weight: time, and memory beyond the weight, its gradient and the state.

Each optimizer runs in a fresh process on the same weight: plain AdamW on 128256×4096 (Llama-3-8B's embedding
and head), the projected methods at rank 1024 on 14336×4096 (its MLP's gate and up: the right side) and
4096×14336 (its down projection: the left side). The first step creates the state (and, for
projected methods, takes the SVD); the later ones are what every step costs. Memory is the process's peak RSS
during a step minus its RSS just before it (write 5 to /proc/self/clear_refs, then read VmHWM), so it is what
the step adds: its temporaries, plus the state on the first step. Every process pins glibc's mmap threshold as
the trainer does (gnlorp.memory.return_freed_memory), so freed temporaries leave the RSS and each step shows its
own; that also makes every temporary of 128 KiB or more cost fresh zero-filled pages, as in training.
`--chunks N ...` instead times ProjectedAdamW's 8-bit rows at each `chunk_numel`: how CHUNK_NUMEL was chosen.
Run:  python benchmarks/streaming_step.py [--quick] [--out DIR] [--only NAME ...] [--json FILE] [--before FILE]
`--before FILE` adds the columns of an earlier run (its `--json`), e.g. of the code before the streaming step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from common import add_output_arguments, machine, write_section

PLAIN, PROJECTED, WIDE = (128256, 4096), (14336, 4096), (4096, 14336)
QUICK_PLAIN, QUICK_PROJECTED, QUICK_WIDE = (16384, 1024), (4096, 1024), (1024, 4096)
RANK, QUICK_RANK = 1024, 256
MIB = 2**20


def _ours(bits: int, rank: int | None = None, weight_norm: bool = False, fused: bool | None = None) -> Callable:
    def make(p, chunk: int | None = None):
        from gnlorp.optim import ProjectedAdamW

        group = {"params": [p]} if rank is None else {
            "params": [p], "rank": rank, "update_proj_gap": 10**6, "weight_norm": weight_norm}
        kwargs = {} if fused is None else {"fused": fused}
        if chunk is not None:
            kwargs["chunk_numel"] = chunk
        return ProjectedAdamW([group], lr=1e-3, bits=bits, **kwargs)
    return make


def _galore_torch(rank: int, bits: int) -> Callable:
    def make(p):
        from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

        group = {"params": [p], "rank": rank, "update_proj_gap": 10**6, "scale": 0.25, "proj_type": "std"}
        if bits == 8:
            return GaLoreAdamW8bit([group], lr=1e-3)
        return GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)
    return make


def _bnb_adamw8bit(p):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit([p], lr=1e-3)


def optimizers(rank: int) -> dict[str, tuple[str, Callable]]:
    """name -> (which weight, how to make the optimizer for it)."""
    return {
        "torch AdamW": ("plain", lambda p: torch.optim.AdamW([p], lr=1e-3)),
        "torch AdamW fused": ("plain", lambda p: torch.optim.AdamW([p], lr=1e-3, fused=True)),
        "bitsandbytes AdamW8bit": ("plain", _bnb_adamw8bit),
        "ProjectedAdamW 32-bit": ("plain", _ours(32)),
        "ProjectedAdamW 8-bit": ("plain", _ours(8)),
        "ProjectedAdamW 8-bit eager": ("plain", _ours(8, fused=False)),
        "galore-torch GaLoreAdamW": ("projected", _galore_torch(rank, 32)),
        "galore-torch GaLoreAdamW8bit": ("projected", _galore_torch(rank, 8)),
        "ProjectedAdamW 32-bit GaLore": ("projected", _ours(32, rank)),
        "ProjectedAdamW 8-bit GaLore": ("projected", _ours(8, rank)),
        "ProjectedAdamW 32-bit GradNormLoRP": ("projected", _ours(32, rank, True)),
        "ProjectedAdamW 8-bit GradNormLoRP": ("projected", _ours(8, rank, True)),
        "galore-torch GaLoreAdamW, left side": ("wide", _galore_torch(rank, 32)),
        "ProjectedAdamW 8-bit GradNormLoRP, left side": ("wide", _ours(8, rank, True)),
    }


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _measured_step(step: Callable[[], object]) -> tuple[float, int]:
    """Seconds and bytes beyond the RSS before it (peak RSS during it minus RSS before)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    start = time.perf_counter()
    step()
    return time.perf_counter() - start, _status("VmHWM") - before


def child(name: str, quick: bool, steps: int, chunk: int | None) -> dict:
    """Run one optimizer in this (fresh) process and return its numbers."""
    warnings.filterwarnings("ignore")
    from gnlorp.memory import return_freed_memory

    return_freed_memory()
    rank = QUICK_RANK if quick else RANK
    weight_kind, make = optimizers(rank)[name]
    shapes = ({"plain": QUICK_PLAIN, "projected": QUICK_PROJECTED, "wide": QUICK_WIDE} if quick else
              {"plain": PLAIN, "projected": PROJECTED, "wide": WIDE})
    shape = shapes[weight_kind]
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
    p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(torch.bfloat16)
    optimizer = make(p) if chunk is None else make(p, chunk)
    first_s, first_bytes = _measured_step(optimizer.step)
    later = [_measured_step(optimizer.step) for _ in range(steps - 1)]
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))
    return {"name": name, "shape": "×".join(map(str, shape)), "rank": rank if weight_kind != "plain" else None,
            "first_s": first_s, "first_extra": first_bytes, "step_s": statistics.median(s for s, _ in later),
            "step_extra": max(b for _, b in later), "state_bytes": state, "chunk": chunk}


def run_all(names: list[str], quick: bool, steps: int, chunk: int | None = None) -> list[dict]:
    results = []
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps),
                               *(["--quick"] if quick else []), *(["--chunk", str(chunk)] if chunk else [])],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"  {name} failed: {tail}", file=sys.stderr, flush=True)
            results.append({"name": name, "failed": tail})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  {name}: step {r['step_s']:.2f} s, extra {r['step_extra'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
    return results


def markdown(results: list[dict], before: dict[str, dict], quick: bool) -> str:
    reference = {r["name"]: r for r in results if "failed" not in r}
    lines = [f"Machine: {machine()}. One bf16 weight; steps after the first: median of the later steps, extra memory "
             "their largest." + (" (--quick: smaller shapes.)" if quick else ""), "",
             "| weight | optimizer | state MiB | first step s | first step extra MiB | step s | step extra MiB |"
             + (" before: step s | before: extra MiB |" if before else ""),
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if before else "")]
    for r in results:
        if "failed" in r:
            lines.append(f"| | {r['name']} | failed: {r['failed']} | | | | |")
            continue
        weight = r["shape"] + (f", rank {r['rank']}" if r["rank"] else "")
        row = (f"| {weight} | {r['name']} | {r['state_bytes'] / MIB:.0f} | {r['first_s']:.2f} | "
               f"{r['first_extra'] / MIB:.0f} | {r['step_s']:.2f} | {r['step_extra'] / MIB:.0f} |")
        if before:
            old = before.get(r["name"])
            row += (f" {old['step_s']:.2f} | {old['step_extra'] / MIB:.0f} |" if old and "failed" not in old
                    else " | |")
        lines.append(row)
    ratios = []
    for ours, theirs in (("ProjectedAdamW 32-bit", "torch AdamW fused"),
                         ("ProjectedAdamW 8-bit", "bitsandbytes AdamW8bit"),
                         ("ProjectedAdamW 32-bit GradNormLoRP", "galore-torch GaLoreAdamW")):
        if ours in reference and theirs in reference:
            ratios.append(f"{ours} / {theirs}: {reference[ours]['step_s'] / reference[theirs]['step_s']:.2f}×")
    if ratios:
        lines += ["", "Step time ratios: " + "; ".join(ratios) + "."]
    return "\n".join(lines)


CHUNK_SWEEP = ("ProjectedAdamW 8-bit", "ProjectedAdamW 8-bit eager", "ProjectedAdamW 8-bit GradNormLoRP",
               "ProjectedAdamW 8-bit GradNormLoRP, left side")


def chunk_table(results: list[dict]) -> str:
    lines = ["| chunk_numel | optimizer | weight | step s | step extra MiB |", "| ---: | --- | --- | ---: | ---: |"]
    for r in results:
        if "failed" in r:
            lines.append(f"| | {r['name']} | failed: {r['failed']} | | |")
            continue
        extra = r["step_extra"] / MIB
        lines.append(f"| {r['chunk']:,} | {r['name']} | {r['shape']} | {r['step_s']:.2f} | {extra:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--only", nargs="+", help="these optimizers (names as in the table)")
    parser.add_argument("--steps", type=int, default=3, help="steps per optimizer, the first included")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--before", type=Path, help="an earlier run's --json, shown beside")
    parser.add_argument("--chunks", type=int, nargs="+", help="time ProjectedAdamW's 8-bit rows at these chunk sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    if args.child:
        print(json.dumps(child(args.child, args.quick, args.steps, args.chunk)))
        return
    if args.chunks:
        results = [r for chunk in args.chunks for r in run_all(list(args.only or CHUNK_SWEEP), args.quick, args.steps,
                                                                chunk)]
        write_section(args.out, "streaming_step-chunks", "### Chunk size\n\n" + chunk_table(results))
        return
    names = args.only or list(optimizers(RANK))
    results = run_all(names, args.quick, args.steps)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    before = {r["name"]: r for r in json.loads(args.before.read_text())} if args.before else {}
    write_section(args.out, "streaming_step", "### One step on one large weight\n\n" + markdown(results, before,
                                                                                               args.quick))


if __name__ == "__main__":
    main()
