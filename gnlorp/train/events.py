"""What a training run reports, as plain dataclasses on a queue: the CLI prints them, the studio draws them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepEvent:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    mem_bytes: int
    peak_mem_bytes: int
    time: float
    grad_energy_kept: float | None = None  # on steps that refreshed projectors: the mean share their ranks keep


@dataclass
class EvalEvent:
    step: int
    eval_loss: float
    eval_accuracy: float | None = None


@dataclass
class SampleEvent:
    """The model's greedy answers at a step: samples.jsonl records (`step`, `prompt`, `text`)."""
    step: int
    samples: list[dict] = field(default_factory=list)


@dataclass
class CheckpointEvent:
    step: int
    path: str


@dataclass
class DoneEvent:
    status: str  # "finished" or "stopped"
    summary: dict = field(default_factory=dict)


@dataclass
class ErrorEvent:
    message: str
    internal: bool = False  # a bug rather than bad input; its traceback is in the run folder's error.log


@dataclass
class DataEvent:
    """What the run trains on, in one line: the data's format and what became of its records."""
    summary: str


@dataclass
class WarningEvent:
    """Something the run survived but should be seen: a skipped non-finite update, an SVD fallback."""
    step: int
    message: str


Event = StepEvent | EvalEvent | SampleEvent | CheckpointEvent | DoneEvent | ErrorEvent | WarningEvent | DataEvent
