"""The run folder's logs as files: lines cut back to a resumed step, and telling a full disk from other failures."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from ..atomic import write_text_atomic

DISK_FULL_FREE_BYTES = 1 << 20  # a failed write with less than this left free is a full disk (torch.save hides ENOSPC)


def truncate_lines(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` logged at `step` or before (and drop a line cut short by a crash)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when the process died or the disk filled up
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def disk_full(exc: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or any failed write with (almost) nothing left free on that disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing is not None and shutil.disk_usage(existing).free < DISK_FULL_FREE_BYTES
