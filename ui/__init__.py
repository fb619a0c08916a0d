"""The gnlorp studio: Gradio tabs over the library's public API (config, memory, jobs, export, data).

One module per tab; `build_studio` puts them on one page. The library never imports this package.
"""

from __future__ import annotations

import dataclasses
import threading

import gradio as gr

from gnlorp.memory import compare

from .budget import DEFAULT_DEVICE, build_budget
from .charts import loss_figure
from .context import Studio
from .export_tab import build_export
from .runs_tab import build_runs
from .setup_tab import build_setup, default_config
from .train_tab import build_train

CSS = """
.gn-error { color: #b00020; font-weight: 600; }
.gn-ok { color: #1b6e35; }
"""
TITLE = "gnlorp studio"


def build_studio(studio: Studio) -> gr.Blocks:
    """The whole page: Setup (with the memory budget), Train, Runs, Export."""
    with gr.Blocks(title=TITLE) as page:
        gr.Markdown(f"## {TITLE}\nPick a model, a dataset, a method and a rank; check the memory budget; "
                    "train with live charts; merge and export a plain Hugging Face folder.")
        with gr.Tabs():
            with gr.Tab("Setup", elem_id="tab-setup"):
                with gr.Row():
                    with gr.Column(scale=1):
                        setup = build_setup(studio, page)
                    with gr.Column(scale=1):
                        gr.Markdown("### Memory budget")
                        build_budget(studio, setup, page)
            with gr.Tab("Train", elem_id="tab-train"):
                build_train(studio, setup)
            with gr.Tab("Runs", elem_id="tab-runs") as runs_tab:
                build_runs(studio, runs_tab)
            with gr.Tab("Export", elem_id="tab-export") as export_tab:
                build_export(studio, export_tab)
    return page


def warm_up(studio: Studio) -> threading.Thread:
    """Pay the first estimate's and the first chart's costs (peft import, plotly templates) in the background."""

    def run() -> None:
        try:
            compare(dataclasses.replace(default_config(studio), output=""), DEFAULT_DEVICE)
            loss_figure([], [])  # plotly loads its templates on the first figure
        except Exception:  # noqa: BLE001 - a failure here shows up, readably, on the first real request
            return

    thread = threading.Thread(target=run, daemon=True, name="gnlorp-warm-up")
    thread.start()
    return thread


__all__ = ["CSS", "TITLE", "Studio", "build_studio", "warm_up"]
