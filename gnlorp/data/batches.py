"""Batches of tokenized examples: packing several examples into one row, padding a batch, and the seeded order."""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterator

import torch

from gnlorp.data.examples import IGNORE_INDEX, Example


def pack_examples(examples: list[Example], seq_len: int) -> list[Example]:
    """Rows of up to seq_len tokens holding several examples each (best fit, longest first), so little of a
    batch is padding. Each example's position ids start again at 0, which is all transformers needs to keep
    attention inside it, and its first label is dropped so no example learns to predict the next one's start."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[Example]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, row index), sorted, for rows that have any
    for i in order:
        length = len(examples[i].input_ids)
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            free, row = room.pop(at)
            rows[row].append(examples[i])
        else:
            free, row = seq_len, len(rows)
            rows.append([examples[i]])
        if free - length > 0:
            bisect.insort(room, (free - length, row))
    return [_joined(parts) for parts in rows]


def _joined(parts: list[Example]) -> Example:
    ids, labels, positions = [], [], []
    for part in parts:
        ids += part.input_ids
        labels += [IGNORE_INDEX, *part.labels[1:]]
        positions += range(len(part.input_ids))
    return Example(ids, labels, positions)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row, with label -100 on the padding. Unpacked rows get an attention mask that
    hides the padding; packed rows get position ids instead (the padding as one more example of its own),
    and no attention mask, since transformers builds the block-diagonal mask from restarting position ids only
    when it is given none."""
    width = max(len(e.input_ids) for e in examples)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    batch = {"input_ids": torch.tensor([padded(e.input_ids, pad_id) for e in examples], dtype=torch.long)}
    if examples[0].position_ids is not None:
        batch["position_ids"] = torch.tensor([e.position_ids + list(range(width - len(e.input_ids)))
                                              for e in examples], dtype=torch.long)
    else:
        batch["attention_mask"] = torch.tensor([padded([1] * len(e.input_ids), 0) for e in examples],
                                               dtype=torch.long)
    if isinstance(examples[0].labels, int):
        batch["labels"] = torch.tensor([e.labels for e in examples], dtype=torch.long)
    else:
        batch["labels"] = torch.tensor([padded(e.labels, IGNORE_INDEX) for e in examples], dtype=torch.long)
    return batch


def batches(examples: list[Example], batch_size: int, seed: int, epoch: int) -> Iterator[list[Example]]:
    """Batches in an order fixed by (seed, epoch) alone, so a resumed run can skip to where it stopped; the
    last batch may be smaller."""
    order = list(range(len(examples)))
    random.Random(seed * 2**32 + epoch).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start:start + batch_size]]
