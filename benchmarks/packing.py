"""Packing chat examples: real tokens per second of training and the share of each batch that is padding, with
and without `--packing`, on the shipped conversations (presets/data/chat.jsonl).

Each setting trains in a fresh process (so neither inherits the other's allocator or caches), as the engine
does: the preset's model, method and optimizer, the engine's batch stream and loss. The first steps warm up
and are not timed; the next ones are, and their real (non-padding) tokens over their summed step time is the
throughput. Padding is counted over a whole epoch of the engine's batches, a deterministic number. Settings run
in alternating order for several rounds, so load from other processes hits both alike; the table gives the
median round. With --out, DIR/packing.md holds the section.

Run:  python benchmarks/packing.py [--quick] [--out DIR] [--config presets/tiny-chat.yaml] [--seq-lens 256,512]
      [--rounds N] [--warmup N] [--steps N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import add_output_arguments, machine, write_section

NAME = "packing"
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "presets" / "tiny-chat.yaml"


def padding(examples: list, batch_size: int, seed: int) -> tuple[float, int]:
    """(share of padded slots, full batches) over one epoch of the engine's batches; each batch is as wide as
    its longest row."""
    from gnlorp.data.batches import batches

    real = slots = steps = 0
    for batch in batches(examples, batch_size, seed, 0):
        if len(batch) < batch_size:  # the engine drops the last, short batch
            continue
        lengths = [len(e.input_ids) for e in batch]
        real, slots, steps = real + sum(lengths), slots + max(lengths) * len(lengths), steps + 1
    return 1 - real / slots, steps


def worker(config: Path, seq_len: int, packing: bool, warmup: int, steps: int) -> dict:
    """Train `warmup + steps` steps as the engine does; the timed steps' real tokens per second, and padding."""
    import torch

    from gnlorp.config import RunConfig
    from gnlorp.data.records import prepare_data
    from gnlorp.methods import get_method
    from gnlorp.models.load import load_model, load_tokenizer
    from gnlorp.optim import build_optimizer
    from gnlorp.optim.build import optimizer_settings
    from gnlorp.train.loss import loss_function
    from gnlorp.train.schedule import micro_batches
    from gnlorp.train.state import Position

    cfg = dataclasses.replace(RunConfig.from_yaml(config), seq_len=seq_len, packing=packing)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    model = get_method(cfg.method).prepare(load_model(cfg.model, cfg.task, seed=cfg.seed), cfg)
    optimizer = build_optimizer(model, **optimizer_settings(cfg))
    loss_of = loss_function(model, model, cfg.chunked_loss)
    stream = micro_batches(data.train, cfg, Position(), 1, 0, tokenizer.pad_token_id)
    model.train()
    tokens, seconds = 0, 0.0
    for step in range(warmup + steps):
        batch, real, *_ = next(stream)
        tick = time.perf_counter()
        loss_of(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens, seconds = tokens + real, seconds + time.perf_counter() - tick
    pad, epoch_steps = padding(data.train, cfg.batch_size, cfg.seed)
    return {"model": cfg.model, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "rows": len(data.train),
            "epoch_steps": epoch_steps, "padding": pad, "tokens_per_s": tokens / seconds}


def measure(config: Path, seq_len: int, packing: bool, warmup: int, steps: int) -> dict:
    argv = [sys.executable, __file__, "--worker", "--config", str(config), "--seq-lens", str(seq_len),
            "--warmup", str(warmup), "--steps", str(steps), "--packing" if packing else "--no-packing"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def section(config: Path, results: dict[tuple[int, bool], list[dict]], rounds: int, warmup: int, steps: int,
            command: str) -> str:
    lines = [
        "## Packing",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Machine: {machine()}. Config `{shown(config)}` on its data's training split, each setting in a fresh "
        f"process: {warmup} warm-up steps, then {steps} timed steps (forward, backward, clipping, optimizer "
        f"step); median of {rounds} round(s) run in alternating order. Tokens/s counts real tokens only; padding "
        "is the share of padded slots over one epoch of the engine's batches (each as wide as its longest row).",
        "",
        "| model | seq_len | packing | batch | rows | steps per epoch | padding | real tokens/s | each round |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (seq_len, packing), runs in sorted(results.items()):
        first, speeds = runs[0], [r["tokens_per_s"] for r in runs]
        lines.append(f"| {first['model']} | {seq_len} | {'on' if packing else 'off'} | {first['batch_size']} | "
                     f"{first['rows']} | {first['epoch_steps']} | {first['padding']:.1%} | "
                     f"{statistics.median(speeds):,.0f} | {' / '.join(f'{v:,.0f}' for v in speeds)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_arguments(parser)
    parser.add_argument("--config", type=Path, default=CONFIG, help="run config to train with (%(default)s)")
    parser.add_argument("--seq-lens", default="256,512", help="comma-separated sequence lengths (%(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both settings")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    args = parser.parse_args()
    seq_lens = [int(v) for v in args.seq_lens.split(",") if v.strip()]
    if args.worker:
        print(json.dumps(worker(args.config, seq_lens[0], args.packing, args.warmup, args.steps)))
        return
    if args.quick:
        seq_lens, args.rounds, args.warmup, args.steps = seq_lens[:1], 1, 1, 3
    config = args.config.resolve()
    results: dict[tuple[int, bool], list[dict]] = {}
    for round_ in range(args.rounds):
        for seq_len in seq_lens:
            for packing in ((True, False) if round_ % 2 == 0 else (False, True)):
                results.setdefault((seq_len, packing), []).append(
                    measure(config, seq_len, packing, args.warmup, args.steps))
    command = " ".join(["python", "benchmarks/packing.py", *sys.argv[1:]])
    write_section(args.out, NAME, section(config, results, args.rounds, args.warmup, args.steps, command))


if __name__ == "__main__":
    main()
