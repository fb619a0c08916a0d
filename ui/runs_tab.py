"""The Runs tab: every run in a table (failed ones with their error, each with its held-out perplexity beside its
base model's), the loss curves of the chosen runs overlaid, the picked run's latest samples, Evaluate (a `gnlorp eval`
child, like Try's), and renaming or deleting a run (after a confirmation) through gnlorp.runs.rename_run /
delete_run."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from gnlorp.config import ConfigError
from gnlorp.runs import RunRecord, check_delete, delete_run, list_runs, read_samples, rename_run

from .charts import human_bytes, overlay_figure
from .context import Studio
from .feedback import guarded, ok
from .train_tab import samples_table

# Short headers and merged cells, so the table fits a 1280-pixel window without a header wrapping letter by letter.
HEADERS = ["run", "status", "model", "method", "steps", "loss", "eval loss", "ppl / base", "peak / predicted",
           "optim. state", "trained params"]
WIDTHS = ["16%", "16%", "7%", "13%", "6%", "6%", "6%", "8%", "10%", "6%", "6%"]


def millions(count: int | None) -> str | None:
    return None if count is None else f"{count / 1e6:.2f} M"


def run_row(run: RunRecord) -> list[Any]:
    """One table row, from the run's config, summary (once it ended), metrics and the studio's record of its job."""
    cfg, summary = run.config, run.summary or {}
    steps = [r for r in run.metrics if "loss" in r]
    evals = [r for r in run.metrics if "eval_loss" in r]
    done = summary.get("steps", steps[-1]["step"] if steps else 0)
    final = summary.get("final_loss", steps[-1]["loss"] if steps else None)
    status, error = run.outcome()
    method = " ".join(str(part) for part in (cfg.get("method"), cfg.get("rank") and f"r{cfg['rank']}",
                                             cfg.get("optim_bits") and f"{cfg['optim_bits']}-bit") if part)
    memory = f"{human_bytes(summary.get('peak_mem_bytes'))} / {human_bytes(summary.get('predicted_peak_bytes'))}"
    figures = run.evaluation or {}
    return [run.name, f"{status}: {error}" if error else status, cfg.get("model"), method,
            f"{done}/{cfg.get('max_steps', '?')}", None if final is None else round(final, 4),
            round(evals[-1]["eval_loss"], 4) if evals else None, perplexities(figures), memory if summary else None,
            human_bytes(summary["optimizer_state_bytes"]) if "optimizer_state_bytes" in summary else None,
            millions(summary.get("trainable_params"))]


def perplexities(figures: dict[str, Any]) -> str | None:
    """eval.json's held-out perplexity beside its base model's, e.g. '61.2 / 4096'."""
    def shown(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, (int, float)) else "–"

    if "perplexity" not in figures and "base" not in figures:
        return None
    return f"{shown(figures.get('perplexity'))} / {shown((figures.get('base') or {}).get('perplexity'))}"


def build_runs(studio: Studio, tab: gr.Tab) -> gr.Dropdown:
    """Render the Runs tab's content; it reloads whenever the tab is opened, Refresh is pressed or a run changes."""
    with gr.Row():
        refresh = gr.Button("Refresh", scale=0)
        message = gr.Markdown(elem_id="runs-message")
    table = gr.Dataframe(headers=HEADERS, label="Runs", interactive=False, elem_id="runs-table", wrap=True,
                         column_widths=WIDTHS)
    with gr.Row(equal_height=True):
        picked = gr.Dropdown([], value=None, label="Run", elem_id="runs-pick", allow_custom_value=True, scale=2,
                             info="Click a row of the table, or pick a run here: its samples show below; "
                             "evaluate, rename or delete it.")
        new_name = gr.Textbox(label="New name", elem_id="runs-new-name", scale=2,
                              info="Letters, digits, '.', '_' and '-'; not the name of another run.")
        rename = gr.Button("Rename", elem_id="runs-rename", scale=1)
        evaluate = gr.Button("Evaluate", elem_id="runs-evaluate", scale=1)
        delete = gr.Button("Delete", variant="stop", elem_id="runs-delete", scale=1)
    with gr.Row(visible=False, elem_id="runs-confirm") as confirm_row:
        question = gr.Markdown(elem_id="runs-confirm-text")
        confirm = gr.Button("Confirm delete", variant="stop", elem_id="runs-confirm-delete", scale=0, min_width=180)
        cancel = gr.Button("Cancel", elem_id="runs-cancel", scale=0)
    with gr.Accordion("Samples of the picked run", open=True, elem_id="runs-samples-panel"):
        samples = gr.Markdown("Pick a run to see its latest samples beside its base model's.", elem_id="runs-samples")
    chosen = gr.Dropdown([], multiselect=True, label="Runs to compare", elem_id="runs-compare",
                         allow_custom_value=True)
    overlay = gr.Plot(label="Loss of the chosen runs", elem_id="chart-overlay")
    errors = studio.error_log

    def listing(selected: list[str] | None, name: str | None) -> tuple:
        """The table's rows, and both run pickers with the runs that still exist."""
        runs = list_runs(studio.runs_dir)
        names = [r.name for r in runs]
        keep = [n for n in (selected or []) if n in names] or names[:3]
        return ([run_row(r) for r in runs], gr.update(choices=names, value=keep),
                gr.update(choices=names, value=name if name in names else None))

    @guarded(4, 0, errors)
    def reload(selected: list[str] | None, name: str | None) -> tuple:
        return gr.skip(), *listing(selected, name)

    @guarded(2, 0, errors)
    def draw(selected: list[str] | None) -> tuple:
        runs = {r.name: r.metrics for r in list_runs(studio.runs_dir) if r.name in (selected or [])}
        return gr.skip(), overlay_figure(runs)

    gr.on([refresh.click, tab.select], reload, inputs=[chosen, picked], outputs=[message, table, chosen, picked],
          api_name="reload_runs")
    chosen.change(draw, inputs=chosen, outputs=[message, overlay], api_name="compare_runs")

    def pick(event: gr.SelectData) -> str | None:
        return (event.row_value or [None])[0]

    table.select(pick, outputs=picked, api_visibility="private")

    def show_samples(name: str | None) -> str:
        run = next((r for r in list_runs(studio.runs_dir) if r.name == name), None)
        return samples_table(read_samples(run.path)) if run is not None else ""

    picked.change(show_samples, inputs=picked, outputs=samples, api_visibility="private")

    @guarded(2, 0, errors)
    def evaluate_picked(name: str | None, selected: list[str] | None) -> tuple:
        """`gnlorp eval` of the picked run in a child (never beside a training), then the table with its figures."""
        if not name:
            raise ConfigError("pick a run to evaluate")
        child = studio.jobs.start_try(["--run", str(studio.run_dir(name)), "--json"], command="eval")
        output = b"".join(child.chunks())
        result = child.finish()
        if result.error:
            raise ConfigError(f"evaluating {name} failed: {result.error}")
        figures = json.loads(output)
        shown = perplexities(figures)
        return (ok(f"evaluated {name} on {figures['examples']} held-out examples: perplexity / base {shown}"),
                *listing(selected, name)[:1])

    evaluate.click(evaluate_picked, inputs=[picked, chosen], outputs=[message, table], api_name="evaluate_run")

    @guarded(3, 0, errors)
    def ask(name: str | None) -> tuple:
        path = check_delete(studio.jobs, name or "")
        text = (f"Really delete **{path.name}**? Its folder {path} (checkpoints, final weights, metrics) is removed "
                "for good; its exports stay.")
        return "", gr.update(visible=True), text

    delete.click(ask, inputs=picked, outputs=[message, confirm_row, question], api_visibility="private")
    picked.change(lambda: gr.update(visible=False), outputs=confirm_row, api_visibility="private")
    cancel.click(lambda name: (ok(f"kept {name}"), gr.update(visible=False)), inputs=picked,
                 outputs=[message, confirm_row], api_visibility="private")

    @guarded(5, 0, errors)
    def remove(name: str | None, selected: list[str] | None) -> tuple:
        path = delete_run(studio.jobs, name or "")
        return ok(f"deleted {path.name}"), gr.update(visible=False), *listing(selected, None)

    confirm.click(remove, inputs=[picked, chosen], outputs=[message, confirm_row, table, chosen, picked],
                  api_name="delete_run")

    @guarded(5, 0, errors)
    def rename_picked(name: str | None, new: str, selected: list[str] | None) -> tuple:
        path = rename_run(studio.jobs, name or "", new)
        renamed = [path.name if n == (name or "").strip() else n for n in (selected or [])]
        return ok(f"renamed {(name or '').strip()} to {path.name}"), "", *listing(renamed, path.name)

    rename.click(rename_picked, inputs=[picked, new_name, chosen], outputs=[message, new_name, table, chosen, picked],
                 api_name="rename_run")

    def runs() -> list[list[Any]]:
        """Every run as a row of the runs table."""
        return [run_row(r) for r in list_runs(studio.runs_dir)]

    gr.api(runs, api_name="runs")
    return chosen
