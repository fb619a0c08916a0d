"""Show a run's events in a terminal: a tqdm bar with loss and ETA, eval lines, one-line errors."""

from __future__ import annotations

import queue
import signal
import sys

from tqdm import tqdm

from ..train import spectrum_log
from ..train.engine import (
    CheckpointEvent,
    DataEvent,
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    StepEvent,
    TrainingRun,
    WarningEvent,
)


def follow(run: TrainingRun) -> int:
    """Train in a background thread and print its events until it ends; Ctrl-C stops it with a checkpoint.

    Returns the exit code: 0 when the run finished or was stopped, 2 for bad input, 1 for anything else.
    The bar appears with the first step, so a run refused at set-up prints only its error line.
    """
    # A shell starts a background command with SIGINT ignored and the process inherits that; the studio stops its
    # training children with SIGINT, so a run started that way must still hear it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    thread = run.start()
    bar, saved = None, None
    try:
        while True:
            try:
                event = run.events.get(timeout=0.5)
            except queue.Empty:
                if not thread.is_alive() and run.events.empty():
                    print("gnlorp train: error: the training thread ended without a result", file=sys.stderr)
                    return 1
                continue
            if isinstance(event, StepEvent):
                if bar is None:
                    bar = tqdm(total=run.cfg.max_steps, initial=event.step - 1, desc="train", unit="step",
                               dynamic_ncols=True, file=sys.stderr)
                bar.update(event.step - bar.n)
                bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", tok_s=f"{event.tokens_per_s:.0f}")
            elif isinstance(event, EvalEvent):
                accuracy = "" if event.eval_accuracy is None else f", eval_accuracy {event.eval_accuracy:.3f}"
                (bar.write if bar else print)(f"step {event.step}: eval_loss {event.eval_loss:.4f}{accuracy}")
            elif isinstance(event, DataEvent):
                print(event.summary, file=sys.stderr)
            elif isinstance(event, WarningEvent):  # e.g. a damaged checkpoint skipped on resume
                (bar.write if bar else print)(f"warning: {event.message}", file=sys.stderr)
            elif isinstance(event, CheckpointEvent):
                saved = event
                if bar is not None:
                    bar.set_description(f"train (saved step {event.step})")
            elif isinstance(event, DoneEvent):
                _close(bar)
                thread.join()  # exiting under a live torch thread can abort the process (rc 134)
                print(f"{event.status}: {event.summary['steps']} steps, final loss {event.summary['final_loss']:.4f}, "
                      f"run folder {run.run_dir}")
                if event.status == "stopped" and saved is not None:  # what the person who stopped it needs next
                    print(f"checkpoint saved at step {saved.step} ({saved.path}); to go on: python -m gnlorp train "
                          f"--resume --output {run.run_dir}")
                advice = spectrum_log.advice_line(event.summary, run.cfg.rank)
                if advice is not None:
                    print(advice)
                return 0
            elif isinstance(event, ErrorEvent):
                _close(bar)
                thread.join()
                print(f"gnlorp train: error: {event.message}", file=sys.stderr)
                return 1 if event.internal else 2
    except KeyboardInterrupt:
        print("\nstopping: saving a checkpoint after the current step", file=sys.stderr)
        run.stop()
        thread.join()
        _close(bar)
        return 0


def _close(bar: tqdm | None) -> None:
    if bar is not None:
        bar.close()
