"""The Memory budget panel: what the chosen run needs, part by part, whether it fits the chosen device, the
largest batch that would, and every method side by side. It follows each change of the form; "Fit to device"
fills the form with the planner's fastest settings that fit."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import gradio as gr

from gnlorp.config import RunConfig
from gnlorp.memory import PARTS, Fit, Plan, compare, describe_weights, devices, fit, plan
from gnlorp.models import download_bytes, gigabytes

from .charts import budget_figure, compare_figure, human_bytes
from .context import Studio
from .feedback import guarded, ok, problem
from .setup_tab import SetupTab
from .widgets import config_to_values, values_to_config

DEFAULT_DEVICE = "rtx-4090"


@dataclass
class BudgetPanel:
    device: gr.Dropdown
    verdict: gr.Markdown


def verdict(cfg: RunConfig, result: Fit) -> str:
    """Fits or not on the device, with the numbers and, when it does not fit, what to change."""
    need, have = human_bytes(result.total_bytes), human_bytes(result.device.capacity_bytes)
    share = result.total_bytes / result.device.capacity_bytes
    largest = (f"Largest batch that fits at sequence length {cfg.seq_len}: {result.max_batch_size}."
               if result.max_batch_size else "Not even a batch of 1 fits.")
    weights = describe_weights(cfg.method, cfg.weight_bits, cfg.dtype)
    if result.fits:
        return ok(f"Fits on {result.device.label} with {weights}: needs {need} of {have} ({share:.0%}). {largest}")
    return problem(f"Does not fit on {result.device.label} with {weights}: needs {need} of {have} ({share:.0%}). "
                   f"{largest} Try a lower batch size or sequence length, 8-bit states, gradnormlorp/galore, "
                   "activation checkpointing, layer-wise updates or 8-bit weights.")


def download_note(cfg: RunConfig) -> str:
    """Beside the verdict for a Hub model whose weights are not cached: the estimate came from its config.json."""
    size = download_bytes(cfg.model, cfg.task, trust_remote_code=cfg.trust_remote_code)
    return "" if size is None else ok(f"{cfg.model}: not downloaded yet, {gigabytes(size)} (estimated from its "
                                      "config.json alone)")


def plan_message(result: Plan) -> str:
    """What the planner changed and what it costs, or what comes closest when nothing fits."""
    need, have = human_bytes(result.predicted_peak_bytes), human_bytes(result.budget_bytes)
    free = f"{result.headroom:.0%} of the card kept free"
    if not result.fits:
        return problem(f"Nothing fits on {result.device.label}: the leanest settings need {need} of {have} ({free}), "
                       f"{human_bytes(result.over_bytes)} over. Try a shorter sequence, fewer sequences per step or a "
                       "larger device.")
    changed = "; ".join(result.changes) or "nothing: the run fits as it is"
    weights = describe_weights(result.config.method, result.config.weight_bits, result.config.dtype)
    return ok(f"Planned for {result.device.label} with {weights}: needs {need} of {have} ({free}), rough step time "
              f"{result.time_factor:.2f}x the unconstrained run's. Changed: {changed}.")


def chosen_figure(cfg: RunConfig, result: Fit) -> Any:
    """This run's parts as one bar; on a GPU the CUDA context is a part of its own, so the bar adds up to the
    verdict's "needs" (the context is the GPU runtime's, a fixed cost before the first tensor)."""
    parts = {**result.estimate, "cuda_context": result.total_bytes - result.estimate["total"],
             "total": result.total_bytes}
    order = (*PARTS, "cuda_context") if parts["cuda_context"] else PARTS
    title = f"{cfg.method}: {human_bytes(result.total_bytes)}, {parts['trainable_params']:,} trainable parameters"
    return budget_figure(parts, order, result.device.capacity_bytes, title)


def device_rows(cfg: RunConfig) -> list[list[Any]]:
    """Every device with its memory and whether this run fits there at its batch size."""
    rows = []
    for device in devices().values():
        verdict = fit(cfg, device)  # the same verdict as the chosen device's, CUDA context included
        rows.append([device.label, human_bytes(device.capacity_bytes), human_bytes(verdict.total_bytes),
                     "yes" if verdict.fits else "no"])
    return rows


def _comparison_key(cfg: RunConfig, device: str) -> tuple:
    """What the all-methods chart depends on: everything but the method (and the run folder)."""
    return (device, *dataclasses.astuple(dataclasses.replace(cfg, method="full", output="")))


def build_budget(studio: Studio, setup: SetupTab, page: gr.Blocks) -> BudgetPanel:
    """Render the budget column (call inside a gr.Column) and wire it to every control of the form."""
    choices = [(d.label, name) for name, d in devices().items()]
    device = gr.Dropdown(choices, value=DEFAULT_DEVICE, label="Device", elem_id="budget-device")
    verdict_md = gr.Markdown(elem_id="budget-verdict")
    chosen = gr.Plot(label="This run", elem_id="budget-chosen")
    table = gr.Dataframe(headers=["device", "memory", "needs", "fits"], label="Devices", interactive=False,
                         elem_id="budget-devices", wrap=True, column_widths=["46%", "20%", "20%", "14%"])
    fit_button = gr.Button("Fit to device", size="sm", elem_id="budget-fit")
    plan_md = gr.Markdown(elem_id="budget-plan")
    everything = gr.Plot(label="All methods", elem_id="budget-compare")
    cache: dict[tuple, dict[str, dict[str, int]]] = {}
    lock = threading.Lock()

    @guarded(3, 0, studio.error_log, cleared={1: None, 2: []})  # no figures of the last model under its error
    def update(*values: Any) -> tuple:
        *form, device_name = values
        cfg = values_to_config(form)
        studio.check_model(cfg)
        result = fit(cfg, device_name)  # one verdict for the line and the bar
        return verdict(cfg, result) + download_note(cfg), chosen_figure(cfg, result), device_rows(cfg)

    @guarded(2, 0, studio.error_log, cleared={1: None})
    def update_all(*values: Any) -> tuple:
        *form, device_name = values
        cfg = values_to_config(form)
        studio.check_model(cfg)
        key = _comparison_key(cfg, device_name)
        with lock:
            if key not in cache:
                cache.clear()  # one entry: the chart follows the form, older settings are not asked again
                cache[key] = compare(cfg, device_name)
        return gr.skip(), compare_figure(cache[key], PARTS, cfg.method)

    inputs = [*setup.inputs, device]
    triggers = [page.load, *(c.change for c in inputs)]
    gr.on(triggers, update, inputs=inputs, outputs=[verdict_md, chosen, table], api_name="budget",
          trigger_mode="always_last", show_progress="hidden")
    gr.on(triggers, update_all, inputs=inputs, outputs=[verdict_md, everything],
          api_name="budget_all_methods", trigger_mode="always_last", show_progress="hidden")

    @guarded(1 + len(setup.inputs), 0, studio.error_log)
    def fit_to_device(*values: Any) -> tuple:
        *form, device_name = values
        cfg = values_to_config(form)
        studio.check_model(cfg)
        result = plan(cfg, device_name)
        filled = config_to_values(result.config) if result.fits else [gr.skip()] * len(setup.inputs)
        return plan_message(result), *filled

    fit_button.click(fit_to_device, inputs=inputs, outputs=[plan_md, *setup.inputs], api_name="fit_to_device")
    return BudgetPanel(device, verdict_md)
