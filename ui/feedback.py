"""Messages in the page instead of tracebacks: every handler runs inside `guarded`."""

from __future__ import annotations

import functools
import html
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from gnlorp.config import ConfigError
from gnlorp.runs import JobError, redact


def ok(text: str) -> str:
    return f'<div class="gn-ok">✓ {html.escape(text)}</div>'


def problem(text: str) -> str:
    return f'<div class="gn-error">⚠ {html.escape(text)}</div>'


def guarded(outputs: int, message_at: int, log: Path) -> Callable[[Callable], Callable]:
    """Wrap a handler so any failure becomes a readable line in its message output and the others stay as they were.

    Bad input (ConfigError) and refused requests (JobError) show their own one-line message; anything else is a
    bug: its traceback goes to `log` and the page says where.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except (ConfigError, JobError) as exc:
                message = str(exc)
            except MemoryError:
                message = "out of memory: choose a smaller model or batch, or close other programs"
            except Exception as exc:
                if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
                    message = "out of memory on the GPU: wait for the training to end or choose a smaller model"
                else:
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with open(log, "a", encoding="utf-8") as handle:
                        handle.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {fn.__name__}\n")
                        handle.write(redact(traceback.format_exc()))
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    message = f"unexpected error ({type(exc).__name__}: {first}); details in {log}"
            message = redact(message)
            if outputs == 1:
                return problem(message)
            values: list[Any] = [gr.skip()] * outputs
            values[message_at] = problem(message)
            return tuple(values)

        return run

    return wrap
