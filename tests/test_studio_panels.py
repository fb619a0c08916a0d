"""The studio's panels follow the run and the form: what each shows after a change, a failure or a resume.

Pure pieces are checked directly against closed forms (the ETA, the form's words, the budget's parts); the panels
that a failure must clear are checked through the running studio's API, as the page calls them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client

from gnlorp.config import RunConfig
from gnlorp.memory import CUDA_CONTEXT, fit
from gnlorp.runs import Snapshot
from gnlorp.runs.store import JobState
from studio_process import studio
from ui.budget import chosen_figure
from ui.feedback import in_form_words
from ui.train_tab import projects


def state(run_dir: Path, command: list[str], started_at: float, max_steps: int = 100) -> JobState:
    return JobState(run_dir=str(run_dir), command=command, max_steps=max_steps, log_path="", started_at=started_at)


def test_eta_after_a_resume_counts_only_this_segments_pace(tmp_path: Path) -> None:
    # Segment one: steps 1-50 at 1 s each; an hour's pause; segment two (this job): steps 51-60 at 3 s each.
    earlier = [{"step": s, "time": 1000.0 + s} for s in range(1, 51)]
    resumed_at = 1050.0 + 3600
    this_job = [{"step": s, "time": resumed_at + 3 * (s - 50)} for s in range(51, 61)]
    snap = Snapshot(state(tmp_path, [], resumed_at), earlier + this_job, [], [], 1)
    assert snap.eta_s() == pytest.approx(3.0 * (100 - 60))  # 40 steps left at this segment's 3 s a step


def test_messages_name_the_form_fields_not_the_flags() -> None:
    said = in_form_words("resume with a higher --max-steps, e.g. --max-steps 8; no column (--text-column) or --force")
    assert said == "resume with a higher 'Steps', e.g. 'Steps' 8; no column ('Text column') or --force"


def test_this_runs_bar_names_the_cuda_context_and_adds_up_to_what_the_verdict_needs() -> None:
    cfg = RunConfig(model="tiny")
    for device, context in (("rtx-4090", CUDA_CONTEXT), ("this-machine", 0)):
        figure = json.loads(chosen_figure(cfg, fit(cfg, device)).to_json())
        bars = {trace["name"]: trace["x"][0] for trace in figure["data"]}
        total = fit(cfg, device).total_bytes
        scale = total / sum(bars.values())  # the bars are in the chart's unit
        assert bars.get("CUDA context", 0) * scale == pytest.approx(context, rel=1e-9)
        assert sum(bars.values()) * scale == pytest.approx(total)


@pytest.mark.parametrize(("method", "shown"), [("lora", False), ("vera", False), ("galore", True),
                                               ("gradnormlorp", True), ("full", False)])
def test_the_spectrum_panel_shows_for_the_methods_that_refresh_projectors(method, shown, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    RunConfig(method=method).to_yaml(config)
    started = Snapshot(state(tmp_path / "run", ["gnlorp", "train", "--config", str(config)], 0.0), [], [], [], 1)
    assert projects(started) is shown
    resumed_dir = tmp_path / "resumed"  # a resumed run's command names no config: its folder has it
    resumed_dir.mkdir()
    RunConfig(method=method).to_yaml(resumed_dir / "config.yaml")
    assert projects(Snapshot(state(resumed_dir, ["gnlorp", "train", "--resume"], 0.0), [], [], [], 1)) is shown


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Client:
    runs = tmp_path_factory.mktemp("panels") / "runs"
    with studio(runs) as url:
        yield Client(url, verbose=False)


def form(client: Client, endpoint: str, **by_label) -> list:
    """The endpoint's inputs at the page's defaults, with the labelled ones changed."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][endpoint]["parameters"]
    unknown = set(by_label) - {p["label"] for p in params}
    assert not unknown, unknown
    return [by_label.get(p["label"], p["parameter_default"]) for p in params]


def test_the_budget_shows_only_the_error_when_the_model_cannot_be_read(client: Client) -> None:
    verdict, chart, table = client.predict(*form(client, "/budget"), api_name="/budget")
    assert "Fits on" in verdict and chart is not None and len(table["data"]) > 3  # the default run: drawn
    verdict, chart, table = client.predict(*form(client, "/budget", Model="/no/such/model"), api_name="/budget")
    assert "⚠" in verdict and chart is None and table["data"] == []
    verdict, everything = client.predict(*form(client, "/budget_all_methods", Model="/no/such/model"),
                                         api_name="/budget_all_methods")
    assert "⚠" in verdict and everything is None


def test_a_refused_dataset_path_clears_the_preview_and_says_so_beside_the_field(client: Client) -> None:
    _, info, table = client.predict(*form(client, "/preview_data"), api_name="/preview_data")
    assert "records" in info and len(table["value"]["data"]) == 5  # the shipped default file
    message, info, table = client.predict(*form(client, "/preview_data", Dataset="/etc/passwd"),
                                          api_name="/preview_data")
    assert "outside the folders the studio may use" in info and "--allow-dir" in info
    assert table["value"] == {"headers": ["(no file)"], "data": [], "metadata": None}

