"""What the Export tab offers to download: the GGUF file itself, or a Hugging Face folder as one zip archive.

Gradio serves only files under the runs folder's exports/ (app.py makes it a static path, so a large file is sent
from where it lies rather than copied into Gradio's cache); an export written elsewhere gets no download.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from gnlorp.atomic import atomic_file

STORED = (".safetensors", ".gguf", ".bin")  # weights barely compress: store them, deflate the rest


def zip_folder(folder: Path, archive: Path) -> Path:
    """Every file of `folder` under the folder's own name in `archive`, written to a temp path and then renamed."""
    with atomic_file(archive) as tmp, zipfile.ZipFile(tmp, "w") as bundle:
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            method = zipfile.ZIP_STORED if path.suffix in STORED else zipfile.ZIP_DEFLATED
            bundle.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}", compress_type=method)
    return archive


def download_file(output: Path, files: dict[str, int], fmt: str, served: Path) -> Path | None:
    """The file to offer for an export in `output` (files: name -> bytes): its .gguf, or a zip of the folder
    beside it; None when it would lie outside `served` (Gradio would not send it)."""
    if fmt == "gguf":
        found = output / next(name for name in files if name.endswith(".gguf"))
    else:
        found = output.with_name(f"{output.name}.zip")
    if not found.resolve().is_relative_to(served.resolve()):
        return None
    return found if fmt == "gguf" else zip_folder(output, found)
