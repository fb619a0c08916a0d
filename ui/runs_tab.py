"""The Runs tab: every run folder in a table, and the loss curves of the chosen runs overlaid."""

from __future__ import annotations

from typing import Any

import gradio as gr

from gnlorp.runs import RunRecord, list_runs

from .charts import human_bytes, overlay_figure
from .context import Studio
from .feedback import guarded

HEADERS = ["run", "status", "model", "method", "rank", "bits", "steps", "final loss", "eval loss", "peak memory",
           "predicted peak", "optimizer state", "trainable"]


def run_row(run: RunRecord) -> list[Any]:
    """One table row, from the run's config, summary (once it ended) and metrics."""
    cfg, summary = run.config, run.summary or {}
    steps = [r for r in run.metrics if "loss" in r]
    evals = [r for r in run.metrics if "eval_loss" in r]
    done = summary.get("steps", steps[-1]["step"] if steps else 0)
    final = summary.get("final_loss", steps[-1]["loss"] if steps else None)
    return [run.name, summary.get("status", "no summary (running or ended early)"), cfg.get("model"),
            cfg.get("method"), cfg.get("rank"), cfg.get("optim_bits"), f"{done}/{cfg.get('max_steps')}",
            None if final is None else round(final, 4), round(evals[-1]["eval_loss"], 4) if evals else None,
            human_bytes(summary.get("peak_mem_bytes")), human_bytes(summary.get("predicted_peak_bytes")),
            human_bytes(summary.get("optimizer_state_bytes")), summary.get("trainable_params")]


def build_runs(studio: Studio, tab: gr.Tab) -> gr.Dropdown:
    """Render the Runs tab's content; it reloads whenever the tab is opened or Refresh is pressed."""
    with gr.Row():
        refresh = gr.Button("Refresh", scale=0)
        message = gr.Markdown()
    table = gr.Dataframe(headers=HEADERS, label="Runs", interactive=False, elem_id="runs-table", wrap=True)
    chosen = gr.Dropdown([], multiselect=True, label="Runs to compare", elem_id="runs-compare",
                         allow_custom_value=True)
    overlay = gr.Plot(label="Loss of the chosen runs", elem_id="chart-overlay")

    @guarded(3, 0, studio.error_log)
    def reload(selected: list[str] | None) -> tuple:
        runs = list_runs(studio.runs_dir)
        names = [r.name for r in runs]
        keep = [n for n in (selected or []) if n in names] or names[:3]
        return gr.skip(), [run_row(r) for r in runs], gr.update(choices=names, value=keep)

    @guarded(2, 0, studio.error_log)
    def draw(selected: list[str] | None) -> tuple:
        runs = {r.name: r.metrics for r in list_runs(studio.runs_dir) if r.name in (selected or [])}
        return gr.skip(), overlay_figure(runs)

    gr.on([refresh.click, tab.select], reload, inputs=chosen, outputs=[message, table, chosen],
          api_name="reload_runs")
    chosen.change(draw, inputs=chosen, outputs=[message, overlay], api_name="compare_runs")

    def runs() -> list[list[Any]]:
        """Every run folder as a row of the runs table."""
        return [run_row(r) for r in list_runs(studio.runs_dir)]

    gr.api(runs, api_name="runs")
    return chosen
