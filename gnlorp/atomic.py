"""Writes that readers never see half done (a temp path beside the target, then a rename), in strict JSON."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temp file beside `path` and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strict_json(value: object, **kwargs) -> str:
    """JSON every reader accepts: a non-finite float (NaN and Infinity are not JSON) becomes null, and the object
    holding it says why in `null_because` (key -> reason), so a reader can tell "not measured" from "blew up"."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        why = {key: f"not a finite number ({item})" for key, item in value.items()
               if isinstance(item, float) and not math.isfinite(item)}
        finite = {key: _finite(item) for key, item in value.items()}
        if why:
            finite["null_because"] = {**(value.get("null_because") or {}), **why}
        return finite
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces `target` (an old one is moved aside, then removed).

    On an exception the temp folder is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target` to write; on success it is renamed over `target`, on an exception removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
