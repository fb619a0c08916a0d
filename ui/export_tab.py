"""The Export tab: pick a run and a format, press Merge & export, get a verified Hugging Face folder or GGUF file
(for llama.cpp and Ollama) and the same as a CLI line.

Below the export result, the Try panel (ui/try_panel.py) runs a run or an exported folder on a prompt or a sentence.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import gradio as gr

from gnlorp.config import ConfigError
from gnlorp.export import export_run
from gnlorp.runs import list_runs

from .charts import human_bytes
from .context import Studio
from .feedback import guarded, ok
from .try_panel import build_try


def exportable_runs(studio: Studio) -> list[str]:
    return [r.name for r in list_runs(studio.runs_dir) if r.exportable]


# The format choice as the user reads it -> (export_run's format, gguf_type).
FORMATS = {"Hugging Face folder": ("hf", "f16"), "GGUF f16 (llama.cpp, Ollama)": ("gguf", "f16"),
           "GGUF q8_0 (llama.cpp, Ollama; half the size)": ("gguf", "q8_0")}
DEFAULT_FORMAT = next(iter(FORMATS))


def cli_command(run_dir: Path, output: Path, force: bool, choice: str = DEFAULT_FORMAT) -> str:
    fmt, gguf_type = FORMATS[choice]
    words = ["python", "-m", "gnlorp", "export", "--run", str(run_dir), "--output", str(output)]
    if fmt == "gguf":
        words += ["--format", "gguf"] + (["--gguf-type", gguf_type] if gguf_type != "f16" else [])
    return shlex.join(words + (["--force"] if force else []))


def build_export(studio: Studio, tab: gr.Tab) -> None:
    """Render the Export tab's content (call inside its gr.Tab)."""
    runs = exportable_runs(studio)
    with gr.Row():
        run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run", elem_id="export-run",
                          allow_custom_value=True, info="Runs with final weights (finished, or stopped).")
        output = gr.Textbox(label="Output folder", elem_id="export-output",
                            info=f"Empty: {studio.exports_dir}/RUN. Must lie inside the studio's folders.")
    choice = gr.Radio(list(FORMATS), value=DEFAULT_FORMAT, label="Format", elem_id="export-format",
                      info="GGUF: one file for llama.cpp and Ollama (LLaMA-family models), with an Ollama Modelfile.")
    force = gr.Checkbox(False, label="Replace a non-empty output folder")
    export = gr.Button("Merge & export", variant="primary", elem_id="export-button")
    message = gr.Markdown(elem_id="export-message")
    result = gr.Markdown(elem_id="export-result")
    files = gr.Dataframe(headers=["file", "size"], label="Files written", interactive=False)
    command = gr.Code(label="Equivalent CLI command", language="shell", interactive=False, elem_id="export-cli")
    errors = studio.error_log

    def paths(name: str | None, folder: str) -> tuple[Path, Path]:
        if not name:
            raise ConfigError("pick a run to export (runs appear once they have final weights)")
        run_dir = studio.run_dir(name)
        target = studio.policy.resolve(folder.strip() or str(studio.exports_dir / name), "Output folder")
        return run_dir, target

    @guarded(4, 0, errors)
    def merge_and_export(name: str | None, folder: str, replace: bool, chosen: str = DEFAULT_FORMAT) -> tuple:
        run_dir, target = paths(name, folder)
        if chosen not in FORMATS:
            raise ConfigError(f"unknown format {chosen!r}; choose one of: {', '.join(FORMATS)}")
        if target.is_dir() and any(target.iterdir()) and not replace:
            raise ConfigError(f"output folder {target} is not empty; choose another or tick 'Replace a non-empty "
                              "output folder'")
        fmt, gguf_type = FORMATS[chosen]
        report = export_run(run_dir, target, force=replace, format=fmt, gguf_type=gguf_type)
        verdict = (f"{report.verdict()}. {len(report.files)} files, {human_bytes(sum(report.files.values()))}."
                   .replace("exported", "Exported", 1))
        rows = [[file, human_bytes(size)] for file, size in sorted(report.files.items())]
        return ok("done"), verdict, rows, cli_command(run_dir, target, replace, chosen)

    export.click(merge_and_export, inputs=[run, output, force, choice], outputs=[message, result, files, command],
                 api_name="export")

    @guarded(2, 0, errors)
    def show_command(name: str | None, folder: str, replace: bool, chosen: str) -> tuple[Any, str]:
        if not name:
            return gr.skip(), ""
        return "", cli_command(*paths(name, folder), replace, chosen)

    gr.on([run.change, output.change, force.change, choice.change, tab.select], show_command,
          inputs=[run, output, force, choice], outputs=[message, command], api_visibility="private",
          trigger_mode="always_last", show_progress="hidden")
    gr.on([tab.select, run.focus], lambda chosen: gr.update(choices=exportable_runs(studio),
                                                            value=chosen or next(iter(exportable_runs(studio)), None)),
          inputs=run, outputs=run, api_visibility="private")
    build_try(studio, tab)
