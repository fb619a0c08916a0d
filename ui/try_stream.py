"""One `gnlorp try` child's answer streamed into the page, for both the prompt and the chat modes of the Try panel.

The child is started through the job manager (never beside a training or another try); a page that stops reading
stops it, and a failure anywhere becomes a message in the page instead of a broken stream.
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gnlorp.runs import try_jobs

from .context import Studio
from .feedback import guarded


def guarded_stream(outputs: int, log: Path) -> Callable[[Callable[..., Iterator]], Callable[..., Iterator]]:
    """`guarded` for a generator handler with `outputs` outputs, the first its message: a failure mid-stream
    becomes its last update."""

    def wrap(fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
        @functools.wraps(fn)
        def run(*args: Any) -> Iterator:
            updates = fn(*args)
            advance = guarded(outputs, 0, log)(functools.wraps(fn)(lambda: next(updates, None)))
            try:
                while (values := advance()) is not None:
                    yield values
            finally:
                updates.close()  # the page went away or the stream ended: its child is stopped

        return run

    return wrap


def stream_try(studio: Studio, argv: list[str], owner: str | None,
               ) -> Iterator[tuple[str, try_jobs.TryResult | None]]:
    """Run `gnlorp try ARGV`: yield (its stdout so far, None) as it grows, then (all of it, how the child ended)."""
    child = studio.jobs.start_try(argv, owner=owner)
    decoder, output = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    try:
        for chunk in child.chunks():
            output += decoder.decode(chunk)
            yield output, None
        output += decoder.decode(b"", final=True)
    finally:
        child.stop()  # only does something when the page stopped reading before the child ended
    yield output, child.finish()
