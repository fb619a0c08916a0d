"""The studio's panels follow the run and the form: what each shows after a change, a failure or a resume.

Pure pieces are checked directly against closed forms (the ETA, the form's words, the budget's parts); the panels
that a failure must clear are checked through the running studio's API, as the page calls them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from gradio_client import Client

from gnlorp.config import RunConfig
from gnlorp.data.chat import CHATML
from gnlorp.memory import CUDA_CONTEXT, fit
from gnlorp.runs import ACTIVE, Snapshot
from gnlorp.runs.store import JobState
from studio_process import studio
from test_try_chat import write_folder
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
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("panels") / "runs"


@pytest.fixture(scope="module")
def client(runs: Path) -> Client:
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
    _, info, table, *rows = client.predict(*form(client, "/preview_data"), api_name="/preview_data")
    assert "records" in info and len(table["value"]["data"]) == 5  # the shipped default file
    assert rows[0]["visible"] is True
    message, info, table, *rows = client.predict(*form(client, "/preview_data", Dataset="/etc/passwd"),
                                          api_name="/preview_data")
    assert "outside the folders the studio may use" in info and "--allow-dir" in info
    assert table["value"] == {"headers": ["(no file)"], "data": [], "metadata": None}
    assert all(row["visible"] is False for row in rows)



def write_messages(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"messages": [{"role": "user", "content": f"Capital of country {i}?"},
                             {"role": "assistant", "content": f"City {i}."}]} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def highlighted(row: dict) -> tuple[str, str, set[str]]:
    """The whole row's text, the text of its trained stretches and the context stretches, from a HighlightedText."""
    pieces = [(p["token"], p["class_or_confidence"]) for p in row["value"]]
    return ("".join(t for t, _ in pieces), "".join(t for t, label in pieces if label == "trained"),
            {t for t, label in pieces if label is None})


def test_the_preview_of_a_chat_file_follows_train_on_and_the_template(client: Client, runs: Path) -> None:
    data = str(write_messages(runs / "uploads" / "chat.jsonl"))
    _, info, table, *rows = client.predict(*form(client, "/preview_data", Dataset=data), api_name="/preview_data")
    assert "data: messages, 6 record(s)" in info and "gn-error" not in info
    text, trained, _ = highlighted(rows[0])
    assert "Capital of country" in text and "Capital" not in trained and "City" in trained
    _, info, _, *rows = client.predict(*form(client, "/preview_data", Dataset=data, **{"Train on": "all"}),
                                       api_name="/preview_data")
    text, trained, context = highlighted(rows[0])
    assert "Capital of country" in trained and context == {"<"}  # all but each example's first token: never predicted
    alone = runs / "uploads" / "alone.jsonl"
    alone.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n", encoding="utf-8")
    _, info, table, *rows = client.predict(*form(client, "/preview_data", Dataset=str(alone)),
                                           api_name="/preview_data")
    assert "no usable messages conversation among 1 record(s)" in info and "gn-error" in info
    assert len(table["value"]["data"]) == 1 and all(row["visible"] is False for row in rows)  # the file as read
    for template, expected in [(str(runs / "uploads" / "none.jinja"), "cannot read chat template"),
                               ("/etc/passwd", "Chat template '/etc/passwd' is outside the folders")]:
        _, info, _, *rows = client.predict(*form(client, "/preview_data", Dataset=data,
                                                 **{"Chat template": template}), api_name="/preview_data")
        assert expected in info.replace("&#x27;", "'") and "gn-error" in info and "root:" not in info
        assert all(row["visible"] is False for row in rows)


def test_a_refused_chat_turn_is_taken_back_with_its_message(client: Client, runs: Path) -> None:
    folder = write_folder(runs / "exports" / "chat-tiny", CHATML)
    assert "a chat model" in client.predict(str(folder), api_name="/try_source")[1]
    busy = {"Steps": 100_000, "Batch size": 2, "Sequence length": 32, "Run name": "busy"}
    assert "started" in client.predict(*form(client, "/start", **busy), api_name="/start")[0]
    said = "Are you there?"
    message, conversation, box = client.predict(
        *form(client, "/try_chat", **{"Model to try": str(folder), "Your message": said}), api_name="/try_chat")
    assert "a training run is going" in message and "gn-error" in message, message
    assert conversation == [] and box == said
    assert "stopping" in client.predict(api_name="/stop")
    deadline = time.monotonic() + 240
    while client.predict(api_name="/status")["status"] in ACTIVE:
        assert time.monotonic() < deadline
        time.sleep(0.5)
