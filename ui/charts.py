"""Plotly figures: the memory budget bars, the live loss and memory charts, and the runs overlay."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PART_LABELS = {"weights": "weights", "gradients": "gradients", "optimizer_states": "optimizer states",
               "projectors": "projectors", "activations": "activations", "overhead": "overhead",
               "cuda_context": "CUDA context"}
PART_COLORS = {"weights": "#4C78A8", "gradients": "#F58518", "optimizer_states": "#E45756",
               "projectors": "#72B7B2", "activations": "#54A24B", "overhead": "#B0B0B0", "cuda_context": "#6B4C9A"}
PALETTE = qualitative.Plotly
UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "B"))


def unit_for(largest: float) -> tuple[int, str]:
    """The largest binary unit that keeps `largest` at 1 or more, so a chart's axis reads naturally."""
    return next(((size, name) for size, name in UNITS if largest >= size), UNITS[-1])


def human_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    size, name = unit_for(abs(value))
    return f"{value / size:.2f} {name}" if size > 1 else f"{value:.0f} B"


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height, margin={"l": 50, "r": 20, "t": 50,
                      "b": 40}, legend={"orientation": "h", "y": -0.3}, template="plotly_white")
    return fig


def budget_figure(parts: dict[str, int], parts_order: tuple[str, ...], capacity: int | None, title: str,
                  ) -> go.Figure:
    """The chosen method's memory as one horizontal stacked bar, with the device's capacity as a line when both
    fit one readable scale (a 100 MiB run against a 24 GiB card would leave the bar invisible)."""
    total = parts.get("total", 0)
    on_scale = bool(capacity) and capacity <= 4 * max(total, 1)
    size, unit = unit_for(max(total, capacity if on_scale else 0))
    fig = go.Figure()
    for part in parts_order:
        fig.add_bar(y=[""], x=[parts.get(part, 0) / size], name=PART_LABELS.get(part, part),
                    orientation="h", marker_color=PART_COLORS.get(part))
    if on_scale:
        fig.add_vline(x=capacity / size, line_dash="dash", line_color="black",
                      annotation_text=f"device {capacity / size:.1f} {unit}")
    fig.update_layout(barmode="stack")
    return _layout(fig, title, unit, "", height=260)


def compare_figure(by_method: dict[str, dict[str, int]], parts_order: tuple[str, ...], chosen: str,
                   ) -> go.Figure:
    """Every method's memory side by side, stacked by part; the chosen one is marked on the axis."""
    size, unit = unit_for(max(parts["total"] for parts in by_method.values()))
    names = [f"▶ {name}" if name == chosen else name for name in by_method]
    fig = go.Figure()
    for part in parts_order:
        fig.add_bar(x=names, y=[parts.get(part, 0) / size for parts in by_method.values()],
                    name=PART_LABELS.get(part, part), marker_color=PART_COLORS.get(part))
    fig.update_layout(barmode="stack")
    return _layout(fig, "All methods, same settings", "method", unit)


def loss_figure(steps: list[dict[str, Any]], evals: list[dict[str, Any]]) -> go.Figure:
    """Training loss per step and held-out loss at each evaluation; a preference run (its records carry
    reward_margin) also gets the reward margin and accuracy beside the loss."""
    preference = any("reward_margin" in r for r in steps)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Reward margin and accuracy")) if preference \
        else go.Figure()
    at = {"row": 1, "col": 1} if preference else {}
    fig.add_scatter(x=[r["step"] for r in steps], y=[r["loss"] for r in steps], mode="lines", name="train", **at)
    fig.add_scatter(x=[r["step"] for r in evals], y=[r["eval_loss"] for r in evals], mode="lines+markers",
                    name="eval", **at)
    if not preference:
        return _layout(fig, "Loss", "step", "loss")
    for key, records, mode in (("reward_margin", steps, "lines"), ("eval_reward_margin", evals, "lines+markers"),
                               ("reward_accuracy", steps, "lines"), ("eval_reward_accuracy", evals, "lines+markers")):
        shown = [r for r in records if key in r]
        fig.add_scatter(x=[r["step"] for r in shown], y=[r[key] for r in shown], mode=mode,
                        name=key.replace("_", " "), row=1, col=2)
    _layout(fig, "", "step", "loss")
    fig.update_xaxes(title_text="step", row=1, col=2)
    return fig


def memory_figure(steps: list[dict[str, Any]], predicted_peak: int | None) -> go.Figure:
    """Measured memory and its running peak per step, with the estimator's predicted peak as a line."""
    largest = max([r.get("peak_mem_bytes", 0) for r in steps] + [predicted_peak or 0, 1])
    size, unit = unit_for(largest)
    x = [r["step"] for r in steps]
    fig = go.Figure()
    fig.add_scatter(x=x, y=[r.get("mem_bytes", 0) / size for r in steps], mode="lines", name="measured")
    fig.add_scatter(x=x, y=[r.get("peak_mem_bytes", 0) / size for r in steps], mode="lines", name="measured peak")
    if predicted_peak:
        fig.add_hline(y=predicted_peak / size, line_dash="dash", line_color="black",
                      annotation_text=f"predicted peak {predicted_peak / size:.2f} {unit}")
    return _layout(fig, "Memory", "step", unit)


def energy_figure(steps: list[dict[str, Any]]) -> go.Figure:
    """The share of the gradient's energy the projection keeps, at each refresh (mean over the matrices)."""
    refreshed = [r for r in steps if r.get("grad_energy_kept") is not None]
    fig = go.Figure()
    fig.add_scatter(x=[r["step"] for r in refreshed], y=[100 * r["grad_energy_kept"] for r in refreshed],
                    mode="lines+markers", name="energy kept")
    fig.update_yaxes(range=[0, 100])
    return _layout(fig, "Gradient energy the rank keeps, at each refresh", "step", "%")


def spectrum_heatmap(lines: list[dict[str, Any]]) -> go.Figure:
    """Energy kept per matrix (rows, in model order) at each refresh (columns): where the rank falls short."""
    names = list(dict.fromkeys(line["name"] for line in lines))
    steps = sorted({line["step"] for line in lines})
    kept = {(line["name"], line["step"]): 100 * line["energy_kept"] for line in lines}
    fig = go.Figure(go.Heatmap(
        x=steps, y=[_short(name) for name in names], zmin=0, zmax=100, colorscale="Viridis",
        z=[[kept.get((name, step)) for step in steps] for name in names], colorbar={"title": "%"},
        hovertemplate="%{y} at step %{x}: %{z:.1f}% kept<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Energy kept per matrix", "step", "", height=max(320, 14 * len(names) + 120))


def _short(name: str) -> str:
    """'model.layers.3.mlp.down_proj.weight' -> '3 mlp.down_proj'."""
    name = name.removesuffix(".weight")
    _, found, tail = name.partition("layers.")
    return tail.replace(".", " ", 1) if found else name


def overlay_figure(runs: dict[str, list[dict[str, Any]]]) -> go.Figure:
    """The loss curves of several runs on one chart (train solid, eval dotted), to compare methods."""
    fig = go.Figure()
    for i, (name, records) in enumerate(runs.items()):
        color = PALETTE[i % len(PALETTE)]
        steps = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        fig.add_scatter(x=[r["step"] for r in steps], y=[r["loss"] for r in steps], mode="lines", name=name,
                        legendgroup=name, line={"color": color})
        if evals:
            fig.add_scatter(x=[r["step"] for r in evals], y=[r["eval_loss"] for r in evals], mode="lines+markers",
                            name=f"{name} (eval)", legendgroup=name, line={"color": color, "dash": "dot"})
    return _layout(fig, "Loss of the chosen runs", "step", "loss", height=420)
