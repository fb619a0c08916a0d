"""The held-out loss (and a classifier's accuracy): a mean over the tokens that carry the loss, so a chat run is
judged on the assistant's answers only, as it is trained."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import RunConfig
from ..data.batches import collate
from ..data.examples import IGNORE_INDEX, Example


@torch.no_grad()
def held_out(model: torch.nn.Module, loss_of: Callable[[dict], torch.Tensor], examples: list[Example],
             cfg: RunConfig, pad_id: int, device: torch.device) -> tuple[float, float | None]:
    """(mean loss per trained token, accuracy for seq-cls else None), with the model in eval mode meanwhile.
    `loss_of` gives a batch's mean loss; each batch counts by its number of predicted tokens."""
    model.eval()
    loss_total, weight_total, correct = 0.0, 0, 0
    for start in range(0, len(examples), cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + cfg.batch_size], pad_id).items()}
        labels = batch["labels"]
        if cfg.task == "seq-cls":
            out = model(**batch)
            weight = labels.numel()
            loss_total += out.loss.item() * weight
            correct += int((out.logits.argmax(-1) == labels).sum())
        else:
            weight = int((labels[:, 1:] != IGNORE_INDEX).sum())
            loss_total += loss_of(batch).item() * weight if weight else 0.0
        weight_total += weight
    model.train()
    return loss_total / max(weight_total, 1), correct / len(examples) if cfg.task == "seq-cls" else None
