"""One prepared GPU check of every CUDA branch the project has, written to one JSON report (under 8 minutes on an
H100-class GPU).

Checks, each pass/fail with its figures:
- codecs: the compiled 8- and 4-bit chunk kernels against the eager ones, a few steps of GaLore and AdamW on one
  4096 × 4096 CUDA weight;
- qlora-4 / qlora-8: `gnlorp train` of LoRA over bitsandbytes' NF4 and int8 base on CUDA (loss falls, export runs);
- int8-weights: the int8 layer under bf16 autocast against a plain layer with the dequantized weight, and
  `gnlorp train` of GradNormLoRP with int8 trained weights (stochastic rounding), stopped and resumed to the same bits;
- memory-chart: the live chart's figures (MemoryMonitor) against torch.cuda's allocator for a tensor of known size;
- llama3-8b-24gb / llama3-8b-16gb: the presets at reduced depth (benchmarks/reduced_depth.py), the CUDA peak against
  the estimate of the same folder, within `--tolerance`.
Exit 1 when a check fails or no CUDA device is there; never a test's dependency.
Run:  python benchmarks/gpu_check.py [--out gpu_check.json] [--layers 2] [--steps 3] [--tolerance 0.05]
      [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from reduced_depth import MIB, run, table

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "64", "--eval-every", "4", "--checkpoint-every", "4",
        "--warmup-steps", "0"]


def gnlorp(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "gnlorp", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"gnlorp {' '.join(args)}: {done.stderr.strip()[-600:]}")
    return done


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def check_codecs() -> dict:
    from gnlorp.optim import ProjectedAdamW

    figures = {}
    for bits in (8, 4):
        for group in ({}, {"rank": 128, "update_proj_gap": 2}):
            weights = [torch.randn(4096, 4096, device="cuda") * 0.02 for _ in range(2)]
            params = [torch.nn.Parameter(w) for w in weights]
            optimizers = [ProjectedAdamW([{"params": [p], **group}], lr=1e-3, bits=bits, fused=fused)
                          for p, fused in zip(params, (True, False), strict=True)]
            for step in range(3):
                grad = torch.randn(4096, 4096, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
                for p, optimizer in zip(params, optimizers, strict=True):
                    p.grad = grad.clone()
                    optimizer.step()
            name = f"{bits}-bit {'galore' if group else 'adamw'}"
            figures[name] = float((params[0] - params[1]).abs().max() / params[1].abs().max())
    return {"ok": all(v < 1e-3 for v in figures.values()), "compiled_vs_eager_rel_max_diff": figures}


def check_qlora(bits: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        gnlorp("train", *TINY, "--method", "lora", "--weight-bits", str(bits), "--lr", "1e-2", "--max-steps", "8",
               "--output", str(out))
        done = gnlorp("export", "--run", str(out), "--output", str(Path(tmp) / "export"))
        seen = losses(out)
        return {"ok": seen[-1] < seen[0], "first_loss": seen[0], "last_loss": seen[-1],
                "export": done.stdout.strip().splitlines()[0]}


def check_int8_weights() -> dict:
    from gnlorp.optim.int8_weight import Int8Weight

    layer = torch.nn.Linear(4096, 1024, device="cuda")
    plain = torch.nn.Linear(4096, 1024, device="cuda")
    layer.weight = torch.nn.Parameter(Int8Weight.from_float(layer.weight.detach()), requires_grad=True)
    plain.weight.data, plain.bias.data = layer.weight.dequantize().clone(), layer.bias.detach().clone()
    x = torch.randn(8, 256, 4096, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        diff = float((layer(x) - plain(x)).abs().max())
    with tempfile.TemporaryDirectory() as tmp:
        args = [*TINY, "--method", "gradnormlorp", "--weight-bits", "8", "--max-steps", "8"]
        gnlorp("train", *args, "--output", f"{tmp}/whole")
        gnlorp("train", *args, "--max-steps", "4", "--output", f"{tmp}/split")
        gnlorp("train", *args, "--output", f"{tmp}/split", "--resume")
        from safetensors.torch import load_file

        a, b = (load_file(f"{tmp}/{name}/final/model.safetensors") for name in ("whole", "split"))
        exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        seen = losses(Path(tmp) / "whole")
    return {"ok": diff < 0.05 and exact and seen[-1] < seen[0], "autocast_max_diff": diff, "resume_exact": exact,
            "first_loss": seen[0], "last_loss": seen[-1]}


def check_memory_chart() -> dict:
    from gnlorp.memory.monitor import MemoryMonitor

    torch.cuda.synchronize()
    monitor = MemoryMonitor(torch.device("cuda"))
    before = monitor.current()
    block = torch.empty(256 * MIB, dtype=torch.uint8, device="cuda")
    grown = monitor.current() - before
    peak = monitor.peak()
    del block
    return {"ok": grown == 256 * MIB and peak >= before + grown, "grown_bytes": grown,
            "allocated_bytes": torch.cuda.memory_allocated(), "peak_bytes": peak}


def check_preset(budget: str, layers: int, steps: int, tolerance: float) -> dict:
    row = run("llama3-8b", layers, steps, [], budget)
    measured, predicted = row["summary"]["peak_mem_bytes"], row["predicted"]["total"]
    print(f"\n**llama3-8b {budget}**, {layers} layers:\n\n{table(row)}\n", flush=True)
    return {"ok": abs(predicted / measured - 1) <= tolerance, "predicted_bytes": predicted, "measured_bytes": measured,
            "error": predicted / measured - 1, "full_depth_total_bytes": row["full_depth"]["total"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--skip", nargs="*", default=[])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 1
    checks = {"codecs": check_codecs, "qlora-4": lambda: check_qlora(4), "qlora-8": lambda: check_qlora(8),
              "int8-weights": check_int8_weights, "memory-chart": check_memory_chart,
              **{f"llama3-8b-{budget}": (lambda b=budget: check_preset(b, args.layers, args.steps, args.tolerance))
                 for budget in ("24gb", "16gb")}}
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "checks": {}}
    for name, check in checks.items():
        if name in args.skip:
            continue
        started = time.time()
        try:
            result = check()
        except Exception as exc:  # a failed check is a result to report, and the next check still runs
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        result["seconds"] = round(time.time() - started, 1)
        report["checks"][name] = result
        print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED'} {json.dumps(result)}", flush=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out)
    return 0 if all(c["ok"] for c in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
