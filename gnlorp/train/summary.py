"""A run's summary.json holds the facts of the whole run, across its segments (the start and each resume).

A resumed segment adds its wall time to the earlier ones', keeps the highest peak of them all and lists every segment,
so a short last segment never replaces what the run as a whole measured.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import strict_json, write_text_atomic

FILE = "summary.json"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary so far; None where it has none or it cannot be read (a crash mid-run leaves none)."""
    try:
        summary = json.loads((run_dir / FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def whole_run(segment: dict[str, Any], first_step: int, previous: dict[str, Any] | None) -> dict[str, Any]:
    """This segment's summary (it trained from `first_step` to segment['steps']) joined with the run's earlier ones."""
    this = {"from_step": first_step, "to_step": segment["steps"], "wall_s": segment["wall_s"],
            "peak_mem_bytes": segment["peak_mem_bytes"], "status": segment["status"]}
    if previous is None:
        return {**segment, "segments": [this]}
    earlier = previous.get("segments") or [{  # a summary written before segments were recorded: one segment
        "from_step": 0, "to_step": previous.get("steps"), "wall_s": previous.get("wall_s"),
        "peak_mem_bytes": previous.get("peak_mem_bytes"), "status": previous.get("status")}]
    segments = [*earlier, this]
    summary = {
        **segment,
        "peak_mem_bytes": max(s["peak_mem_bytes"] or 0 for s in segments),
        "wall_s": sum(s["wall_s"] or 0.0 for s in segments),
        "segments": segments,
    }
    if segment["steps"] == first_step and previous.get("final_loss") is not None:  # this segment trained nothing
        summary["final_loss"] = previous["final_loss"]
    return summary


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(run_dir / FILE, strict_json(summary, indent=1))
