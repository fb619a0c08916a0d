"""Engine overhead: tokens/s of TrainingRun against a bare torch loop on the same model, data and optimizer.

Both train the same config; the bare loop does only forward, backward, clipping, the optimizer and the
schedule. Throughput is taken over steps 2..N (the first step pays one-off costs), alternating the two
for --repeats rounds, and the medians are compared. Run:  python benchmarks/engine_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from gnlorp.config import RunConfig
from gnlorp.data.batches import batches, collate
from gnlorp.data.records import prepare_data
from gnlorp.methods import get_method
from gnlorp.models.load import load_model, load_tokenizer
from gnlorp.optim import ProjectedAdamW
from gnlorp.train.engine import StepEvent, TrainingRun
from gnlorp.train.schedule import lr_factor


def bare_loop(cfg: RunConfig) -> float:
    """Tokens/s of the plainest loop that trains what the engine trains."""
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    method = get_method(cfg.method)
    model = method.prepare(load_model(cfg.model, cfg.task, seed=cfg.seed), cfg)
    optimizer = ProjectedAdamW(method.param_groups(model, cfg), lr=cfg.lr, bits=cfg.optim_bits)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    model.train()
    stream = (b for epoch in range(10**6) for b in batches(data.train, cfg.batch_size, cfg.seed, epoch)
              if len(b) == cfg.batch_size)
    tokens, start = 0, 0.0
    for step in range(cfg.max_steps):
        if step == 1:
            tokens, start = 0, time.perf_counter()
        batch = collate(next(stream), tokenizer.pad_token_id)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def engine(cfg: RunConfig) -> float:
    """Tokens/s of TrainingRun over the same steps, from its own step events (metrics, events, sampling included)."""
    with tempfile.TemporaryDirectory() as folder:
        cfg = RunConfig.from_dict({**cfg.__dict__, "output": f"{folder}/run"})
        run = TrainingRun(cfg)
        run.run()
        steps = []
        while not run.events.empty():
            event = run.events.get()
            if isinstance(event, StepEvent):
                steps.append(event)
    tokens = cfg.batch_size * cfg.seq_len * (len(steps) - 1)
    return tokens / (steps[-1].time - steps[0].time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--method", default="gradnormlorp")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    steps = 10 if args.quick else 40
    cfg = RunConfig.from_dict({"method": args.method, "max_steps": steps, "eval_every": 10**6,
                               "checkpoint_every": 10**6, "batch_size": 8, "seq_len": 128})
    rounds = 1 if args.quick else args.repeats
    bare, ours = [], []
    for _ in range(rounds):
        bare.append(bare_loop(cfg))
        ours.append(engine(cfg))
    b, e = statistics.median(bare), statistics.median(ours)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
          f"tiny, {args.method}, 8-bit, batch 8 x 128, {steps} steps, median of {rounds}")
    print("| loop | tokens/s | relative |\n| --- | ---: | ---: |")
    print(f"| bare torch loop | {b:.0f} | 1.00 |\n| gnlorp engine | {e:.0f} | {e / b:.2f} |")


if __name__ == "__main__":
    main()
