"""Step time per method: whole training steps (forward, backward, optimizer) of one model on the same batches.

Every contender gets its own copy of the same initial weights (the preset's seeded init) and the same token
batches; they are stepped round-robin, one step each in turn (the starting contender rotates every round),
so whatever else loads the machine hits them all alike. Baselines: torch AdamW fp32, bitsandbytes AdamW8bit
and galore-torch GaLoreAdamW on the same targets as gnlorp's galore; beside them gnlorp's methods, built as
the engine builds them (preset model, method.prepare, method.param_groups, ProjectedAdamW).

The first step (state allocation, and for projected optimizers every matrix's first SVD) and the steps on
which a projector refresh falls are reported apart from the ordinary steps. Memory: the bytes of every
tensor in the optimizer state (galore-torch's projector object included); on CUDA also each contender's
peak on its own (its weights and state plus the largest transient of its steps, from
torch.cuda.max_memory_allocated after a reset before each step). A CPU process's RSS never shrinks, so a
per-contender peak cannot be read there in one process; the CPU table gives state bytes only. With --out,
DIR/step_time.md holds the section, DIR/step_time-ratios.png the ratios and DIR/step_time.json every step's time.

Run:  python benchmarks/step_time.py [--quick] [--out DIR] [--steps N] [--batch-size B] [--seq-len L]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import add_output_arguments, device, machine, save_png, write_section
from gnlorp.config import RunConfig
from gnlorp.data.batches import batches, collate
from gnlorp.data.records import prepare_data
from gnlorp.methods import GALORE, get_method
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.optim import ProjectedAdamW, state_bytes
from optimizer import galore_torch_state_bytes

NAME = "step_time"
BASELINE = "torch AdamW fp32"
GNLORP_METHODS = [("full", 32), ("full", 8), ("galore", 32), ("galore", 8), ("gradnormlorp", 32),
                  ("gradnormlorp", 8), ("lora", 32), ("dora", 32), ("vera", 32)]
GALORE_TORCH_KEYS = ("params", "rank", "update_proj_gap", "scale", "proj_type")


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    count_state: Callable[[torch.optim.Optimizer], int]
    refreshes: Callable[[int], int]  # step index (0-based) -> matrices that take an SVD on that step
    times_ms: list[float] = field(default_factory=list)
    optimizer_ms: list[float] = field(default_factory=list)  # the optimizer.step() part of each step
    losses: list[float] = field(default_factory=list)
    peak_bytes: int = 0  # CUDA only: weights + state + the step's transient, at its largest


def ours_refreshes(optimizer: ProjectedAdamW) -> Callable[[int], int]:
    """ProjectedAdamW's schedule: every matrix at step 0, then each at its own offset mod update_proj_gap."""
    def count(step: int) -> int:
        return sum(1 for group in optimizer.param_groups if "rank" in group for p in group["params"]
                   if step == 0 or step % group["update_proj_gap"] == optimizer.refresh_offset(p, group))
    return count


def galore_torch_refreshes(optimizer: torch.optim.Optimizer) -> Callable[[int], int]:
    """galore-torch's schedule: every matrix at once on steps 0, T, 2T, ..."""
    def count(step: int) -> int:
        return sum(len(group["params"]) for group in optimizer.param_groups
                   if "rank" in group and step % group["update_proj_gap"] == 0)
    return count


def base_model(cfg: RunConfig, where: torch.device) -> torch.nn.Module:
    """The preset with its seeded initial weights: every call gives the same weights."""
    return load_model(cfg.model, cfg.task, dtype=getattr(torch, cfg.dtype), seed=cfg.seed).to(where)


def gnlorp_contender(cfg: RunConfig, where: torch.device) -> Contender:
    """Model and optimizer as the engine builds them (gnlorp/train/engine.py, TrainingRun._train)."""
    method = get_method(cfg.method)
    model = method.prepare(base_model(cfg, where), cfg)
    optimizer = ProjectedAdamW(method.param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                               bits=cfg.optim_bits)
    name = f"gnlorp {cfg.method} {cfg.optim_bits}-bit"
    return Contender(name, model, optimizer, state_bytes, ours_refreshes(optimizer))


def baseline_contenders(cfg: RunConfig, where: torch.device) -> list[Contender]:
    """torch AdamW fp32 and bitsandbytes AdamW8bit on every weight; galore-torch on gnlorp galore's targets."""
    import bitsandbytes as bnb
    from galore_torch import GaLoreAdamW

    never = lambda step: 0  # noqa: E731
    model = base_model(cfg, where)
    adamw = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    contenders = [Contender(BASELINE, model, adamw, state_bytes, never)]
    model = base_model(cfg, where)
    adam8 = bnb.optim.AdamW8bit(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    contenders.append(Contender("bitsandbytes AdamW8bit", model, adam8, state_bytes, never))
    model = GALORE.prepare(base_model(cfg, where), cfg)
    groups = [{k: v for k, v in group.items() if k in GALORE_TORCH_KEYS} for group in GALORE.param_groups(model, cfg)]
    galore = GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, no_deprecation_warning=True)
    contenders.append(Contender("galore-torch GaLoreAdamW", model, galore, galore_torch_state_bytes,
                                galore_torch_refreshes(galore)))
    return contenders


def token_batches(cfg: RunConfig, count: int, where: torch.device) -> list[dict[str, torch.Tensor]]:
    """The first `count` training batches of the shipped data, in the engine's order; every contender gets these."""
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    stream = (b for epoch in range(10**6) for b in batches(data.train, cfg.batch_size, cfg.seed, epoch)
              if len(b) == cfg.batch_size)
    return [{k: v.to(where) for k, v in collate(next(stream), tokenizer.pad_token_id).items()} for _ in range(count)]


def resting_bytes(contender: Contender) -> int:
    """What the contender holds between steps: its weights and buffers, and its optimizer state."""
    held = [*contender.model.parameters(), *contender.model.buffers()]
    return sum(t.numel() * t.element_size() for t in held) + contender.count_state(contender.optimizer)


def train_step(contender: Contender, batch: dict[str, torch.Tensor], where: torch.device) -> None:
    """Forward, backward, optimizer step; timed, and on CUDA with this contender's peak."""
    cuda = where.type == "cuda"
    # bf16 autocast on CUDA, as the engine's accelerator (mixed_precision="bf16") does there.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    if cuda:
        torch.cuda.synchronize()
        before, resting = torch.cuda.memory_allocated(), resting_bytes(contender)
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with autocast:
        loss = contender.model(**batch).loss
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    backward_done = time.perf_counter()
    contender.optimizer.step()
    contender.optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    end = time.perf_counter()
    contender.times_ms.append((end - start) * 1e3)
    contender.optimizer_ms.append((end - backward_done) * 1e3)
    contender.losses.append(loss.item())
    if cuda:
        transient = torch.cuda.max_memory_allocated() - before
        contender.peak_bytes = max(contender.peak_bytes, resting + transient)


def run(contenders: list[Contender], data: list[dict[str, torch.Tensor]], where: torch.device) -> None:
    """Step every contender once per round, on the round's batch; the starting contender rotates."""
    for round_index, batch in enumerate(data):
        print(f"round {round_index + 1}/{len(data)}", file=sys.stderr, flush=True)
        gc.collect()
        shift = round_index % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            contender.model.train()
            train_step(contender, batch, where)


@dataclass
class Row:
    name: str
    trainable: int
    state_bytes: int
    first_ms: float
    median_ms: float
    p90_ms: float
    optimizer_ms: float
    mean_ms: float
    refresh_steps: int
    refresh_median_ms: float | None
    peak_bytes: int
    vs_adamw: float = 0.0


def summarize(contender: Contender) -> Row:
    """Ordinary steps (after the first, no SVD) give median and p90; refresh steps are counted apart."""
    later = list(enumerate(contender.times_ms))[1:]
    ordinary = [ms for step, ms in later if contender.refreshes(step) == 0]
    optimizer = [ms for step, ms in enumerate(contender.optimizer_ms) if step and contender.refreshes(step) == 0]
    refresh = [ms for step, ms in later if contender.refreshes(step) > 0]
    trainable = sum(p.numel() for p in contender.model.parameters() if p.requires_grad)
    if not ordinary:  # a gap so short that every step refreshes a projector
        ordinary = optimizer = [float("nan")]
    return Row(contender.name, trainable, contender.count_state(contender.optimizer), contender.times_ms[0],
               statistics.median(ordinary), float(np.percentile(ordinary, 90)), statistics.median(optimizer),
               statistics.fmean(ms for _, ms in later), len(refresh),
               statistics.median(refresh) if refresh else None, contender.peak_bytes)


def markdown(rows: list[Row], cfg: RunConfig, steps: int, where: torch.device, command: str, wall_s: float,
             first_losses: list[float]) -> str:
    cuda = where.type == "cuda"
    memory_note = ("CUDA peak: the optimizer's own weights and state plus the largest transient of its steps "
                   "(torch.cuda.max_memory_allocated, reset before each step), bf16 autocast." if cuda else
                   "CPU: state bytes only (a process's RSS does not shrink, so one process cannot give each "
                   "optimizer its own peak).")
    header = ("| optimizer | trainable params | state MiB | first step ms | median ms | p90 ms | optimizer.step ms "
              "| × AdamW fp32 "
              "| refresh steps | refresh median ms | mean ms, steps ≥ 1 |" + (" CUDA peak MiB |" if cuda else ""))
    lines = [
        "### Step time per method (table 3)",
        "",
        f"```bash\n{command}\n```",
        "",
        f"Machine: {machine()}. Wall time {wall_s:.0f} s.",
        "",
        f"`{cfg.model}`, batch {cfg.batch_size} × {cfg.seq_len} tokens of the shipped fortunes (the same {steps} "
        f"batches for every optimizer), lr {cfg.lr}, no weight decay, no clipping, rank {cfg.rank} for every "
        f"low-rank method, update_proj_gap {cfg.update_proj_gap}; gnlorp's projected methods with staggered "
        f"refresh (RunConfig's default), galore-torch has none; lora/dora/vera with 32-bit Adam states. "
        f"{steps} rounds, one step of each optimizer per round. Median and p90 are over the ordinary steps "
        f"(after the first, no projector refresh), and so is the optimizer.step ms (the part of those steps after "
        f"backward: step and zero_grad); refresh steps are counted apart; the mean covers every step after the "
        f"first. All {len(rows)} copies started from the same weights: first loss {min(first_losses):.4f} to "
        f"{max(first_losses):.4f}. {memory_note}",
        "",
        header,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if cuda else ""),
    ]
    for r in rows:
        refresh = f"{r.refresh_median_ms:.0f}" if r.refresh_median_ms is not None else "-"
        line = (f"| {r.name} | {r.trainable:,} | {r.state_bytes / 2**20:.2f} | {r.first_ms:.0f} | {r.median_ms:.1f} "
                f"| {r.p90_ms:.1f} | {r.optimizer_ms:.1f} | {r.vs_adamw:.2f} | {r.refresh_steps} | {refresh} "
                f"| {r.mean_ms:.1f} |")
        lines.append(line + (f" {r.peak_bytes / 2**20:.0f} |" if cuda else ""))
    return "\n".join(lines)


def write_raw(out: Path, contenders: list[Contender], settings: dict, steps: int) -> None:
    """Every step's time, for anyone who wants to check the medians: DIR/step_time.json (temp file, then rename)."""
    raw = {"machine": machine(), "settings": settings, "rounds": steps, "contenders": {
        c.name: {"times_ms": c.times_ms, "optimizer_ms": c.optimizer_ms, "losses": c.losses,
                 "refreshes": [c.refreshes(step) for step in range(steps)]} for c in contenders}}
    tmp = out / f".{NAME}.json.tmp"
    tmp.write_text(json.dumps(raw, indent=1))
    tmp.replace(out / f"{NAME}.json")


def figure(rows: list[Row], title: str):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[r.vs_adamw for r in rows], y=[r.name for r in rows], orientation="h",
                           text=[f"{r.vs_adamw:.2f}" for r in rows], textposition="outside"))
    fig.add_vline(x=1.0, line_dash="dash")
    fig.update_layout(title=title, xaxis_title="median step time ÷ torch AdamW fp32 (ordinary steps)",
                      yaxis={"autorange": "reversed"}, margin={"l": 220})
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--model", help="preset (default: llama-60m; tiny with --quick)")
    parser.add_argument("--steps", type=int, help="rounds, the first included (default 20; 12 with --quick)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default 4; 8 with --quick)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, help="rank of every low-rank method (default 128; 16 with --quick)")
    parser.add_argument("--update-proj-gap", type=int, default=RunConfig.update_proj_gap)
    args = parser.parse_args()
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is reported apart from the rest)")
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    where = device()
    model = args.model or ("tiny" if args.quick else "llama-60m")
    steps = args.steps or (12 if args.quick else 20)
    settings = {"model": model, "batch_size": args.batch_size or (8 if args.quick else 4), "seq_len": args.seq_len,
                "rank": args.rank or (16 if args.quick else 128), "update_proj_gap": args.update_proj_gap,
                "weight_decay": 0.0}
    cfg = RunConfig.from_dict(settings)
    contenders = baseline_contenders(cfg, where)
    for method, bits in GNLORP_METHODS:
        contenders.append(gnlorp_contender(RunConfig.from_dict({**settings, "method": method, "optim_bits": bits}),
                                           where))
    embeddings = contenders[0].model.get_input_embeddings().weight
    if not all(torch.equal(c.model.get_input_embeddings().weight, embeddings) for c in contenders):
        raise SystemExit("the copies did not start from the same weights")
    run(contenders, token_batches(cfg, steps, where), where)

    first = [c.losses[0] for c in contenders]
    rows = [summarize(c) for c in contenders]
    for r in rows:
        r.vs_adamw = r.median_ms / rows[0].median_ms
    command = "python benchmarks/step_time.py" + (" --quick" if args.quick else "")
    for flag, value in (("--model", args.model), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--rank", args.rank)):
        if value is not None:
            command += f" {flag} {value}"
    if args.seq_len != 128:
        command += f" --seq-len {args.seq_len}"
    if args.update_proj_gap != RunConfig.update_proj_gap:
        command += f" --update-proj-gap {args.update_proj_gap}"
    section = markdown(rows, cfg, steps, where, command, time.perf_counter() - started, first)
    write_section(args.out, NAME, section)
    if args.out is not None:
        write_raw(Path(args.out), contenders, settings, steps)
        title = f"Step time per optimizer, {model}, batch {cfg.batch_size} × {cfg.seq_len}, {where.type}"
        save_png(figure(rows, title), Path(args.out) / f"{NAME}-ratios.png")


if __name__ == "__main__":
    main()
