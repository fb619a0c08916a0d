"""Messages in the page instead of tracebacks: every handler runs inside `guarded`."""

from __future__ import annotations

import functools
import html
import re
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from gnlorp.config import ConfigError, config_fields
from gnlorp.runs import JobError, redact

from .widgets import label


def ok(text: str) -> str:
    return f'<div class="gn-ok">✓ {html.escape(text)}</div>'


def problem(text: str) -> str:
    return f'<div class="gn-error">⚠ {html.escape(text)}</div>'


_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def in_form_words(message: str) -> str:
    """The library's messages name command-line flags; in the studio each becomes the form field that sets it."""
    fields = {f.name.replace("_", "-") for f in config_fields()}
    return _FLAG.sub(lambda m: f"'{label(m.group(1).replace('-', '_'))}'" if m.group(1) in fields else m.group(0),
                     message)


def guarded(outputs: int, message_at: int, log: Path, cleared: dict[int, Any] | None = None,
            ) -> Callable[[Callable], Callable]:
    """Wrap a handler so any failure becomes a readable line in its message output; the other outputs stay as they
    were, except those in `cleared` (index -> value), which would otherwise show what the failed request replaced.

    Bad input (ConfigError) and refused requests (JobError) show their own one-line message, in the form's words;
    anything else is a bug: its traceback goes to `log` and the page says where.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any) -> Any:
            try:
                return fn(*args)
            except (ConfigError, JobError) as exc:
                message = in_form_words(str(exc))
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
            for index, value in (cleared or {}).items():
                values[index] = value
            values[message_at] = problem(message)
            return tuple(values)

        return run

    return wrap
