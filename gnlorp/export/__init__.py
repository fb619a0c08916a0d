"""Export: a finished run as a plain Hugging Face folder (hf) or one GGUF file (gguf), each checked by reading it
back; report holds what both writers share, infer loads runs and folders to try them.

`export_run` picks the writer, so neither writer imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError

if TYPE_CHECKING:
    from .report import ExportReport

FORMATS = ("hf", "gguf")


def export_run(run_dir: str | Path, output_dir: str | Path, *, force: bool = False, format: str = "hf",
               gguf_type: str = "f16") -> ExportReport:
    """Merge the run's final weights into `output_dir`, verified by reading the written files back.

    format "hf" writes a plain model folder (export.hf); "gguf" one .gguf file (`gguf_type` f16 or q8_0) and an
    Ollama Modelfile (export.gguf). Refuses a non-empty `output_dir` unless `force`, in which case the old folder is
    replaced only once the new one has passed the check.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    if format == "gguf":
        from .gguf import export_gguf

        return export_gguf(run_dir, output_dir, force=force, gguf_type=gguf_type)
    from .hf import export_hf

    return export_hf(run_dir, output_dir, force=force)


__all__ = ["FORMATS", "export_run"]
