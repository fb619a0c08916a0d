"""What a projector refresh's exact SVD adds to a process's memory, against the estimator's formula.

For each m×n shape a fresh process takes `torch.linalg.svd(G, full_matrices=False)` of an fp32 m×n matrix (as a
refresh does) and reports its peak RSS minus its RSS before (write 5 to /proc/self/clear_refs, read VmHWM), with
glibc's mmap threshold pinned as in training. The estimator predicts it as SVD_FLOATS_PER_MN·m·n +
SVD_FLOATS_PER_K2·k² floats, k = min(m, n) (gnlorp/optim/streaming.py; a refresh also holds the m×n input).
Run:  python benchmarks/svd_memory.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import add_output_arguments, machine, write_section

SHAPES = [(2048, 2048), (4096, 4096), (4096, 1024), (1024, 4096), (8192, 2048), (16384, 1024), (14336, 4096),
          (4096, 14336)]
QUICK_SHAPES = [(1024, 1024), (2048, 512), (512, 2048)]
MIB = 2**20


def child(m: int, n: int) -> dict:
    import torch

    from gnlorp.memory import return_freed_memory

    return_freed_memory()

    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    matrix = torch.randn(m, n)
    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    torch.linalg.svd(matrix, full_matrices=False)
    return {"m": m, "n": n, "extra": status("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    from gnlorp.optim.streaming import SVD_FLOATS_PER_K2, SVD_FLOATS_PER_MN

    lines = [f"Machine: {machine()}.", "", "| shape | measured MiB | predicted MiB | error |",
             "| --- | ---: | ---: | ---: |"]
    for m, n in QUICK_SHAPES if args.quick else SHAPES:
        proc = subprocess.run([sys.executable, __file__, "--child", str(m), str(n)], capture_output=True, text=True,
                              check=True)
        extra = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
        predicted = 4 * (SVD_FLOATS_PER_MN * m * n + SVD_FLOATS_PER_K2 * min(m, n) ** 2)
        lines.append(f"| {m}×{n} | {extra / MIB:.0f} | {predicted / MIB:.0f} | {predicted / extra - 1:+.1%} |")
        print(lines[-1], file=sys.stderr, flush=True)
    write_section(args.out, "svd_memory", "### A refresh's SVD: memory\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
