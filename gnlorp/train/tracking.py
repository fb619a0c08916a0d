"""`--report-to tensorboard`: the run's metrics.jsonl records, also as TensorBoard scalars through accelerate.

metrics.jsonl stays the one source. Every record the engine appends is handed to accelerate's tracker as it is
written, and a resumed run rebuilds the event files from its metrics.jsonl (already cut back to the checkpoint),
so TensorBoard never shows a step twice nor a step the resumed run took back. Only the main process logs.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from ..config import ConfigError
from ..runs.store import read_metrics, read_samples

FOLDER = "tensorboard"  # inside the run folder: `tensorboard --logdir RUN/tensorboard`
TAGS = {  # metrics.jsonl key -> scalar tag; TensorBoard groups tags by what precedes the slash
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
    "grad_energy_kept": "train/grad_energy_kept", "mem_bytes": "memory/mem_bytes",
    "peak_mem_bytes": "memory/peak_mem_bytes", "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy",
}


def accelerator_options(report_to: str, run_dir: Path) -> dict[str, Any]:
    """The Accelerator's tracking arguments; a missing package is refused here, before anything is written."""
    if report_to == "none":
        return {}
    if importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"report_to {report_to} needs the {report_to} package: pip install 'gnlorp[{report_to}]' "
                          "(or set report_to to none)")
    return {"log_with": report_to, "project_dir": str(run_dir)}


class Tracker:
    """accelerate's trackers fed with metrics.jsonl records, on the main process."""

    def __init__(self, accelerator: Accelerator, run_dir: Path):
        self.accelerator = accelerator
        self.warnings = 0  # incidents so far, logged as a running count beside each message
        if (run_dir / FOLDER).exists():  # a resumed run's: rewritten below from metrics.jsonl
            shutil.rmtree(run_dir / FOLDER)
        accelerator.init_trackers(FOLDER)  # writes to project_dir/FOLDER
        for record in read_metrics(run_dir):
            self.log(record)
        self.log_samples(read_samples(run_dir))

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record at its step and wall time: numbers as scalars, a warning as text and a count."""
        values: dict[str, Any] = {TAGS[k]: v for k, v in record.items() if k in TAGS and v is not None}
        if "warning" in record:
            self.warnings += 1
            values |= {"warnings/count": self.warnings, "warnings/message": record["warning"]}
        if values:
            self.accelerator.log(values, step=record["step"],
                                 log_kwargs={"tensorboard": {"walltime": record.get("time")}})

    def log_samples(self, records: list[dict[str, Any]]) -> None:
        """samples.jsonl records as text, one tag per prompt (`samples/1`, ...): the prompt, then the answer."""
        by_step: dict[int, dict[str, str]] = {}
        for record in records:
            tags = by_step.setdefault(record["step"], {})
            prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
            tags[f"samples/{len(tags) + 1}"] = f"**{prompt}**\n\n{record['text']}"
        for step, values in by_step.items():
            self.accelerator.log(values, step=step)

    def close(self) -> None:
        """Flush and close the event files. Not accelerator.end_training(): that also destroys the process group."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
