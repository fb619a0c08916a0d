"""The Runs tab through the studio's API (gradio_client), as the page calls it: a failed run listed with its error,
and Delete and Rename refusing the running run, names that leave the runs folder, bad names and taken names.

The studio runs as `python app.py` in a subprocess with a temporary runs folder; what it says is checked against the
folders on disk and the run's own log.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client

from studio_process import studio

ACTIVE = ("starting", "running", "stopping")
LONG = {"Steps": 100_000, "Batch size": 2, "Sequence length": 32, "Checkpoint every": 2, "Eval every": 1000,
        "Warm-up steps": 1}


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[Client, dict, Path]:
    runs = tmp_path_factory.mktemp("studio-runs") / "runs"
    with studio(runs) as url:
        client = Client(url, verbose=False)
        yield client, client.view_api(return_format="dict", print_info=False)["named_endpoints"], runs


def start(client: Client, api: dict, **by_label) -> str:
    params = api["/start"]["parameters"]
    return client.predict(*[by_label.get(p["label"], p["parameter_default"]) for p in params], api_name="/start")[0]


def wait_for(client: Client, done, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while not done(state := client.predict(api_name="/status")):
        assert time.monotonic() < deadline, state
        time.sleep(0.5)
    return state


def rows(client: Client) -> dict[str, list]:
    return {row[0]: row for row in client.predict(api_name="/runs")}


def layout(runs: Path) -> set[str]:
    """The run folders and the studio's records of them (not their contents, which a running run changes)."""
    records = [p for folder in ("jobs", "configs", "logs") for p in (runs / ".studio" / folder).glob("[!.]*")]
    return {p.name for p in runs.iterdir() if not p.name.startswith(".")} | {str(p.relative_to(runs)) for p in records}


def text(message: str) -> str:
    return message.replace("&#x27;", "'")


@pytest.fixture(scope="module")
def failed(lab) -> str:
    """A run that failed on a missing dataset, before it wrote its folder."""
    client, api, _ = lab
    assert "started" in start(client, api, **{"Run name": "fails-early", "Dataset": "presets/data/missing.jsonl"})
    assert wait_for(client, lambda s: s["status"] not in ACTIVE)["status"] == "failed"
    return "fails-early"


def test_a_failed_run_is_listed_with_its_error(lab, failed: str) -> None:
    client, _, runs = lab
    log = (runs / ".studio" / "logs" / f"{failed}.log").read_text()
    printed = [line.split(": error: ", 1)[1] for line in log.splitlines() if line.startswith("gnlorp train: error:")]
    assert printed and "cannot read data file" in printed[-1]
    row = rows(client)[failed]
    assert row[1] == f"failed: {printed[-1]}" and row[2] == "tiny"
    reloaded = client.predict([], None, api_name="/reload_runs")[1]
    assert [failed, f"failed: {printed[-1]}"] in [r[:2] for r in reloaded["data"]]


def test_delete_and_rename_refuse_the_running_run_and_names_outside_the_runs_folder(lab, failed: str) -> None:
    client, api, runs = lab
    assert "started" in start(client, api, **{"Run name": "busy", **LONG})
    wait_for(client, lambda s: s["train_points"] >= 1)
    before = layout(runs)

    for message in (client.predict("busy", [], api_name="/delete_run")[0],
                    client.predict("busy", "calm", [], api_name="/rename_run")[0]):
        assert "busy is training now" in text(message) and "gn-error" in message, message
    for name in ("../busy", "busy/..", "/etc", "..", "exports", ".studio", f"{runs}/busy"):
        message = text(client.predict(name, [], api_name="/delete_run")[0])
        assert "gn-error" in message and ("not a plain folder name" in message or "own folder" in message), message
        message = text(client.predict(name, "calm", [], api_name="/rename_run")[0])
        assert "gn-error" in message and ("not a plain folder name" in message or "own folder" in message), message
    for new in ("../calm", "a/b", "", "/tmp/calm"):
        message = text(client.predict(failed, new, [], api_name="/rename_run")[0])
        assert "gn-error" in message and ("not a plain folder name" in message or "none given" in message), message
    assert layout(runs) == before
    assert (runs / "busy" / "config.yaml").is_file()

    assert "stopping" in client.predict(api_name="/stop")
    assert wait_for(client, lambda s: s["status"] not in ACTIVE)["status"] == "stopped"
    message = text(client.predict("busy", failed, [], api_name="/rename_run")[0])
    assert f"a run named '{failed}' already exists" in message, message
    message, _, table, _, picked = client.predict("busy", "calm", [], api_name="/rename_run")
    assert "renamed busy to calm" in message and picked["value"] == "calm"
    assert (runs / "calm" / "config.yaml").is_file() and not (runs / "busy").exists()
    assert "calm" in [r[0] for r in table["data"]] and "busy" not in [r[0] for r in table["data"]]

    message, *_ = client.predict("calm", [], api_name="/delete_run")
    assert "deleted calm" in message and not (runs / "calm").exists()
    assert "calm" not in rows(client)
    message, *_ = client.predict(failed, [], api_name="/delete_run")
    assert f"deleted {failed}" in message and rows(client) == {}
