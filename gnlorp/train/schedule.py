"""When the run sees what: the learning-rate schedule and the endless, resumable stream of micro-batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from ..config import ConfigError, RunConfig
from ..data.batches import batches
from ..data.examples import Example
from ..data.preference import collate_rows
from .state import Position


def lr_factor(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak (GaLore's schedule)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def micro_batches(examples: list[Example], cfg: RunConfig, position: Position, world: int, rank: int, pad_id: int,
                  ) -> Iterator[tuple[dict[str, torch.Tensor], int, int, int]]:
    """Endless micro-batches for this process, starting at `position`, each with its number of real (not
    padding) tokens and the position after it.

    Every process walks the same global order of batches of batch_size × world and takes its own slice,
    which is what makes data-parallel training and resuming both exact.
    """
    if len(examples) < cfg.batch_size * world:
        kind = "packed rows" if examples and examples[0].position_ids is not None else "training examples"
        raise ConfigError(f"only {len(examples)} {kind} for a global batch of {cfg.batch_size * world}; "
                          "lower --batch-size or add data")
    epoch, index = position.epoch, position.batch_index
    while True:
        global_size = cfg.batch_size * world
        epoch_batches = [b for b in batches(examples, global_size, cfg.seed, epoch) if len(b) == global_size]
        for i in range(index, len(epoch_batches)):
            shard = epoch_batches[i][rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
            following = (epoch, i + 1) if i + 1 < len(epoch_batches) else (epoch + 1, 0)
            yield collate_rows(shard, pad_id), sum(len(e.input_ids) for e in shard), *following
        epoch, index = epoch + 1, 0
