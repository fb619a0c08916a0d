"""The Setup tab: model, dataset (shipped, uploaded or a path) with a preview, method, rank, the other knobs, presets.

The memory budget (budget.py) sits beside the form and follows every change.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from gnlorp.config import ConfigError, RunConfig
from gnlorp.data import SUPPORTED, read_records, read_table
from gnlorp.methods import METHODS
from gnlorp.models import cached_models, describe_origin, gigabytes, parse_hub_id, pin, preset_names

from .context import NAME, Studio
from .data_preview import COLOR_MAP, FIELDS, SHOWN_ROWS, training_view
from .feedback import guarded, in_form_words, ok, problem
from .widgets import config_to_values, config_widgets, form_fields, preset_files, values_to_config

DEFAULT_PRESET = "tiny-gradnormlorp.yaml"
DOWNLOAD_PROGRESS = gr.Progress(track_tqdm=True)  # huggingface_hub's download bars, drawn on the page
PREVIEW_ROWS = 5


@dataclass
class SetupTab:
    form: dict[str, gr.Component]  # every RunConfig field the form shows, in form_fields() order
    message: gr.Markdown

    @property
    def inputs(self) -> list[gr.Component]:
        return list(self.form.values())


def default_config(studio: Studio) -> RunConfig:
    """The form's first values: the tiny demo preset, so Start trains something small at once."""
    preset = studio.presets_dir / DEFAULT_PRESET
    return RunConfig.from_yaml(preset) if preset.is_file() else RunConfig()


def shipped_data(studio: Studio) -> list[str]:
    """Data files that ship in presets/data and those uploaded into the runs folder, as paths to show."""
    shipped = [f"presets/data/{p.name}" for p in sorted((studio.presets_dir / "data").glob("*"))
               if p.suffix in SUPPORTED and p.name != "README.md"]
    uploaded = [str(p) for p in sorted(studio.uploads_dir.glob("*"))] if studio.uploads_dir.is_dir() else []
    return shipped + uploaded


def model_choices() -> list[tuple[str, str]]:
    """The presets, then every model in the local Hugging Face cache with its size on disk."""
    cached = [(f"{repo} ({gigabytes(size)} on disk)", repo) for repo, size in cached_models()]
    return [(name, name) for name in preset_names()] + cached


def method_lines() -> str:
    return "\n".join(f"- **{name}**: {method.summary}" for name, method in METHODS.items())


def build_setup(studio: Studio, page: gr.Blocks) -> SetupTab:
    """Render the settings column (call inside a gr.Column); returns its controls for the other tabs."""
    cfg = default_config(studio)
    extras: dict[str, Any] = {}

    def model_picker(common: dict) -> gr.Component:
        common["info"] += (" Pick a preset or a model in your Hugging Face cache, or type a folder path or a Hub id "
                           "(ORG/NAME, ORG/NAME@REVISION).")
        dropdown = gr.Dropdown(choices=model_choices(), allow_custom_value=True, **common)
        extras["model_origin"] = gr.Markdown(elem_id="model-origin")
        extras["download"] = gr.Button("Download", size="sm", elem_id="model-download")
        return dropdown

    def data_picker(common: dict) -> gr.Component:
        common["info"] += " Pick a shipped file, upload one, or type a path."
        dropdown = gr.Dropdown(choices=shipped_data(studio), allow_custom_value=True, **common)
        extras["upload"] = gr.UploadButton("Upload a data file", file_types=list(SUPPORTED), size="sm")
        with gr.Accordion("Dataset preview", open=True):
            extras["preview_info"] = gr.Markdown(elem_id="data-preview-info")
            extras["preview_rows"] = [
                gr.HighlightedText(label=f"Training row {i} (green carries the loss)", color_map=COLOR_MAP,
                                   show_legend=True, visible=False, elem_id=f"data-preview-row-{i}")
                for i in range(1, SHOWN_ROWS + 1)]
            extras["preview_table"] = gr.Dataframe(label="First rows", interactive=False, wrap=True, max_height=260)
        return dropdown

    def method_picker(common: dict) -> gr.Component:
        radio = gr.Radio(choices=list(METHODS), **common)
        gr.Markdown(method_lines(), elem_id="method-summaries")
        return radio

    with gr.Row():
        preset = gr.Dropdown(preset_files(studio.presets_dir), value=DEFAULT_PRESET, label="Preset", scale=3)
        load = gr.Button("Load preset", scale=1)
        preset_name = gr.Textbox(label="Save as preset", placeholder="my-run", scale=2)
        save = gr.Button("Save preset", scale=1)
    message = gr.Markdown(elem_id="setup-message")
    form = config_widgets(cfg, "basic", {"model": model_picker, "data": data_picker, "method": method_picker})
    preview_info, preview_table = extras["preview_info"], extras["preview_table"]
    with gr.Accordion("Dataset columns", open=False):
        form |= config_widgets(cfg, "data", {})
    with gr.Accordion("Advanced", open=False):
        form |= config_widgets(cfg, "advanced", {})
    tab = SetupTab({f.name: form[f.name] for f in form_fields()}, message)
    log = studio.error_log

    hidden_rows = [gr.update(value=None, visible=False)] * SHOWN_ROWS
    cleared = {2: gr.update(value=[], headers=["(no file)"])} | {3 + i: row for i, row in enumerate(hidden_rows)}

    @guarded(3 + SHOWN_ROWS, 1, log, cleared=cleared)  # the error beside the field
    def preview(*values: Any) -> tuple:
        cfg = studio.check_inputs(values_to_config(values))
        columns, rows = read_table(cfg.data, cfg)
        shown = [[_cell(row.get(c)) for c in columns] for row in rows[:PREVIEW_ROWS]]
        info = f"{len(rows):,} records · columns: {', '.join(map(str, columns))}"
        training = hidden_rows
        try:
            if cfg.task == "seq-cls":
                read_records(cfg.data, cfg)
                status = ok(f"{info} · {detect(columns, cfg)}")
            else:
                summary, warnings, pieces = training_view(cfg)
                status = ok(info) + ok(summary) + "".join(problem(w) for w in warnings)
                training = [gr.update(value=row, visible=True) for row in pieces]
                training += hidden_rows[len(training):]
        except ConfigError as exc:
            status = ok(info) + problem(f"with the current settings: {in_form_words(str(exc))}")
        return gr.skip(), status, gr.update(value=shown, headers=[str(c) for c in columns]), *training

    gr.on([page.load, *(form[name].change for name in FIELDS)], preview, inputs=tab.inputs,
          outputs=[message, preview_info, preview_table, *extras["preview_rows"]], api_name="preview_data",
          trigger_mode="always_last", show_progress="hidden")

    def origin(model: str) -> str:
        return describe_origin(model) if model else ""

    gr.on([page.load, form["model"].change], origin, inputs=form["model"], outputs=extras["model_origin"],
          api_name="model_origin", show_progress="hidden")

    @guarded(2, 0, log)
    def download(model: str, trust_remote_code: bool, progress: gr.Progress = DOWNLOAD_PROGRESS) -> tuple:
        """Fetch a Hub model into the Hugging Face cache here, with a progress bar, so a run trains it offline."""
        if parse_hub_id(model or "") is None:
            raise ConfigError("Download fetches a Hub model: type its id (ORG/NAME) in Model")
        pinned = pin(model, trust_remote_code=trust_remote_code)
        return ok(f"downloaded {pinned} into the Hugging Face cache"), gr.update(choices=model_choices())

    extras["download"].click(download, inputs=[form["model"], form["trust_remote_code"]],
                             outputs=[message, form["model"]], api_name="download_model")

    @guarded(2, 0, log)
    def upload(file: str | None) -> tuple[str, Any]:
        if not file:
            return "", gr.skip()
        source = Path(file)
        target = studio.uploads_dir / source.name
        if target.exists():
            target = target.with_name(f"{target.stem}-{int(source.stat().st_mtime)}{target.suffix}")
        studio.uploads_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return ok(f"uploaded {source.name} to {target}"), gr.update(choices=shipped_data(studio), value=str(target))

    extras["upload"].upload(upload, inputs=extras["upload"], outputs=[message, form["data"]], api_name="upload_data")

    @guarded(1 + len(tab.inputs), 0, log)
    def load_preset(name: str | None) -> tuple:
        if not name:
            raise ConfigError("pick a preset to load")
        cfg = RunConfig.from_yaml(studio.policy.resolve(str(studio.presets_dir / name), "Preset"))
        return ok(f"loaded {name}"), *config_to_values(cfg)

    load.click(load_preset, inputs=preset, outputs=[message, *tab.inputs], api_name="load_preset")

    @guarded(2, 0, log)
    def save_preset(name: str, *values: Any) -> tuple[str, Any]:
        name = (name or "").strip().removesuffix(".yaml")
        if not NAME.match(name):
            raise ConfigError("preset name: use letters, digits, '.', '_' and '-' (up to 80), e.g. my-run")
        path = studio.presets_dir / f"{name}.yaml"
        if path.exists():
            raise ConfigError(f"preset {path.name} already exists; choose another name")
        values_to_config(values, output=f"runs/{name}").to_yaml(path)
        return ok(f"saved {path}"), gr.update(choices=preset_files(studio.presets_dir), value=path.name)

    save.click(save_preset, inputs=[preset_name, *tab.inputs], outputs=[message, preset], api_name="save_preset")
    return tab


def detect(columns: list[str], cfg: RunConfig) -> str:
    """Which task and columns this file suits, read off its column names and the column settings."""
    if cfg.label_column in columns and cfg.text_column in columns:
        return f"looks like classification (seq-cls): text '{cfg.text_column}', label '{cfg.label_column}'"
    if cfg.prompt_column in columns and cfg.response_column in columns:
        return (f"looks like instructions (causal-lm, loss on the response): prompt '{cfg.prompt_column}', "
                f"response '{cfg.response_column}'")
    if cfg.text_column in columns:
        return f"looks like plain text (causal-lm): text '{cfg.text_column}'"
    return "no column matches the column settings; set them under Dataset columns"


def _cell(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"

