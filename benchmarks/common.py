"""What every benchmark script shares, so the report (benchmarks/report.py) can run them all the same way.

Contract: a script that the report runs takes `--quick` (a small version, minutes on a laptop CPU) and
`--out DIR`; it prints its markdown section and, with `--out`, also writes it to `DIR/<name>.md` and its
figures to `DIR/<name>-*.png`. The same script runs unchanged on a GPU: `device()` picks CUDA when there is one.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
from pathlib import Path

import psutil
import torch

CHROMIUM = "/usr/bin/chromium"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small version that runs in minutes")
    parser.add_argument("--out", type=Path, default=None, help="also write the section (and figures) here")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def machine() -> str:
    """One line saying where the numbers came from."""
    line = (f"{platform.machine()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}")
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    else:
        line += ", no GPU"
    return line


def write_section(out: Path | None, name: str, markdown: str) -> None:
    """Print the section; with an output folder also write it there (temp file, then rename)."""
    print(markdown, flush=True)
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.md.tmp"
    tmp.write_text(markdown.rstrip() + "\n")
    tmp.replace(out / f"{name}.md")


def save_png(fig, path: Path, width: int = 900, height: int = 500) -> None:
    """Write a plotly figure as PNG through kaleido (`pip install -e .[bench]`), using Debian's Chromium if present."""
    if "BROWSER_PATH" not in os.environ and shutil.which(CHROMIUM):
        os.environ["BROWSER_PATH"] = CHROMIUM
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.write_image(tmp, width=width, height=height)
    tmp.replace(path)
