"""What tokenized data looks like, shared by the readers (records) and the chat renderer (chat) without either
importing the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100


@dataclass
class Example:
    """One training sequence: token ids and either per-token labels (causal LM) or one class id (seq-cls); a
    packed row also has position ids, which restart at each example it holds."""

    input_ids: list[int]
    labels: list[int] | int
    position_ids: list[int] | None = None


@dataclass
class TokenizedData:
    """`report` says what was read and kept (format, records, skipped records and examples by reason, and
    `warnings` a run shows), so a run or `gnlorp data` can tell a person what became of their file.
    `chat_template` is the template the examples were rendered with (None when none was): the run saves it with its
    tokenizer, so trying and exporting the model prompt it in the format it learned."""

    train: list[Example]
    eval: list[Example]
    label_names: list[str] | None = None
    report: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    prompts: list[str | list[dict[str, Any]]] = field(default_factory=list)  # held-out openings, to sample from
