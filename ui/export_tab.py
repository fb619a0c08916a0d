"""The Export tab: pick a run and a format, press Merge & export, get a verified Hugging Face folder or GGUF file
(for llama.cpp and Ollama), a Download of it, and the same as a CLI line. Each run and format has its own default
folder (exports/RUN-hf, exports/RUN-gguf-q8_0, ...), so exporting a second format never meets the first's files.

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
from .downloads import download_file
from .feedback import guarded, ok
from .try_panel import build_try


def exportable_runs(studio: Studio) -> list[str]:
    return [r.name for r in list_runs(studio.runs_dir) if r.exportable]


# The format choice as the user reads it -> (export_run's format, gguf_type).
FORMATS = {"Hugging Face folder": ("hf", "f16"), "GGUF f16 (llama.cpp, Ollama)": ("gguf", "f16"),
           "GGUF q8_0 (llama.cpp, Ollama; half the size)": ("gguf", "q8_0")}
DEFAULT_FORMAT = next(iter(FORMATS))
# What each choice writes and what reads it: the Format radio's help text follows the choice.
FORMAT_HELP = {
    "Hugging Face folder": "A folder of model.safetensors, config.json and the tokenizer files; loads with "
                           "transformers' from_pretrained (Download: the folder as one .zip).",
    "GGUF f16 (llama.cpp, Ollama)": "One .gguf file in 16-bit floats for llama.cpp and Ollama (LLaMA-family models), "
                                    "with an Ollama Modelfile beside it (Download: the .gguf).",
    "GGUF q8_0 (llama.cpp, Ollama; half the size)": "One .gguf file with 8-bit (q8_0) weights, half the size of f16, "
                                                    "for llama.cpp and Ollama, with an Ollama Modelfile beside it "
                                                    "(Download: the .gguf).",
}


def default_output(studio: Studio, name: str, choice: str) -> Path:
    """exports/RUN-hf, exports/RUN-gguf-f16 or exports/RUN-gguf-q8_0: one folder per run and format."""
    fmt, gguf_type = FORMATS.get(choice, FORMATS[DEFAULT_FORMAT])
    return studio.exports_dir / (f"{name}-hf" if fmt == "hf" else f"{name}-gguf-{gguf_type}")


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
                            placeholder=str(default_output(studio, runs[0] if runs else "RUN", DEFAULT_FORMAT)),
                            info=f"Empty: the folder shown, {studio.exports_dir}/RUN-FORMAT. Must lie inside the "
                            "studio's folders; only exports under exports/ can be downloaded.")
    choice = gr.Radio(list(FORMATS), value=DEFAULT_FORMAT, label="Format", elem_id="export-format",
                      info=FORMAT_HELP[DEFAULT_FORMAT])
    force = gr.Checkbox(False, label="Replace a non-empty output folder")
    export = gr.Button("Merge & export", variant="primary", elem_id="export-button")
    message = gr.Markdown(elem_id="export-message")
    result = gr.Markdown(elem_id="export-result")
    files = gr.Dataframe(headers=["file", "size"], label="Files written", interactive=False, elem_id="export-files")
    download = gr.DownloadButton("Download", visible=False, elem_id="export-download")
    command = gr.Code(label="Equivalent CLI command", language="shell", interactive=False, elem_id="export-cli")
    errors = studio.error_log

    def paths(name: str | None, folder: str, chosen: str) -> tuple[Path, Path]:
        if not name:
            raise ConfigError("pick a run to export (runs appear once they have final weights)")
        run_dir = studio.run_dir(name)
        target = studio.policy.resolve(folder.strip() or str(default_output(studio, run_dir.name, chosen)),
                                       "Output folder")
        return run_dir, target

    def clear(name: str | None, chosen: str) -> tuple:
        """Before an export: the last one's result, files and download go, so a failure never sits above them."""
        return f"Exporting {name or 'the run'} as {chosen}…", "", [], gr.update(value=None, visible=False)

    @guarded(5, 0, errors)
    def merge_and_export(name: str | None, folder: str, replace: bool, chosen: str = DEFAULT_FORMAT) -> tuple:
        if chosen not in FORMATS:
            raise ConfigError(f"unknown format {chosen!r}; choose one of: {', '.join(FORMATS)}")
        run_dir, target = paths(name, folder, chosen)
        if target.is_dir() and any(target.iterdir()) and not replace:
            raise ConfigError(f"output folder {target} is not empty; choose another or tick 'Replace a non-empty "
                              "output folder'")
        fmt, gguf_type = FORMATS[chosen]
        report = export_run(run_dir, target, force=replace, format=fmt, gguf_type=gguf_type)
        verdict = (f"{report.verdict()}. {len(report.files)} files, {human_bytes(sum(report.files.values()))}."
                   .replace("exported", "Exported", 1))
        rows = [[file, human_bytes(size)] for file, size in sorted(report.files.items())]
        served = download_file(report.output, report.files, fmt, studio.exports_dir)
        offer = (gr.update(value=str(served), label=f"Download {served.name} ({human_bytes(served.stat().st_size)})",
                           visible=True) if served else gr.update(value=None, visible=False))
        return ok("done"), verdict, rows, offer, cli_command(run_dir, target, replace, chosen)

    export.click(clear, inputs=[run, choice], outputs=[message, result, files, download], api_visibility="private",
                 show_progress="hidden").then(merge_and_export, inputs=[run, output, force, choice],
                                              outputs=[message, result, files, download, command], api_name="export")

    @guarded(2, 0, errors)
    def show_command(name: str | None, folder: str, replace: bool, chosen: str) -> tuple[Any, str]:
        if not name:
            return gr.skip(), ""
        return "", cli_command(*paths(name, folder, chosen), replace, chosen)

    gr.on([run.change, output.change, force.change, choice.change, tab.select], show_command,
          inputs=[run, output, force, choice], outputs=[message, command], api_visibility="private",
          trigger_mode="always_last", show_progress="hidden")

    def describe(name: str | None, chosen: str) -> tuple:
        """The chosen format's help text, and its default folder for this run as the Output folder's placeholder."""
        return (gr.update(placeholder=str(default_output(studio, name or "RUN", chosen))),
                gr.update(info=FORMAT_HELP.get(chosen, "")))

    gr.on([run.change, choice.change, tab.select], describe, inputs=[run, choice], outputs=[output, choice],
          api_visibility="private", show_progress="hidden")
    def offer_runs(chosen: str | None) -> Any:
        """The exportable runs now (one may have been renamed or deleted on the Runs tab), keeping the choice."""
        runs = exportable_runs(studio)
        return gr.update(choices=runs, value=chosen if chosen in runs else next(iter(runs), None))

    gr.on([tab.select, run.focus], offer_runs, inputs=run, outputs=run, api_visibility="private")
    build_try(studio, tab)
