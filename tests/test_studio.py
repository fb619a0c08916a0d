"""The studio through its API (gradio_client), as the page calls it: budget, data preview, errors, train, export.

The studio runs as `python app.py` in a subprocess with a temporary runs folder. Results are checked against
independent sources: the library's estimate, the data file read with json, metrics.jsonl and checkpoints on
disk, and the exported folder loaded with transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from gradio_client import Client, handle_file
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from gnlorp.config import RunConfig
from gnlorp.export.gguf import GGUF_TOLERANCE
from gnlorp.memory import PARTS, estimate, fit, plan
from studio_process import ENV, ROOT, studio

# So many steps that a run is always still going when a test stops it, however loaded the machine.
FAST = {"Steps": 100_000, "Batch size": 4, "Sequence length": 64, "Eval every": 4, "Checkpoint every": 4,
        "Warm-up steps": 1}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Client:
    runs = tmp_path_factory.mktemp("studio") / "runs"
    with studio(runs) as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def api(client: Client) -> dict:
    return client.view_api(return_format="dict", print_info=False)["named_endpoints"]


def call(client: Client, api: dict, endpoint: str, **by_label):
    """Call an endpoint with the page's default values, changing the inputs whose label is given."""
    params = api[endpoint]["parameters"]
    labels = [p["label"] for p in params]
    unknown = set(by_label) - set(labels)
    assert not unknown, f"{endpoint} has no inputs labelled {unknown}"
    values = [by_label.get(p["label"], p["parameter_default"]) for p in params]
    return client.predict(*values, api_name=endpoint)


def status(client: Client) -> dict:
    return client.predict(api_name="/status")


def wait_for(client: Client, done, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = status(client)
        if done(state):
            return state
        time.sleep(0.5)
    raise AssertionError(f"timed out; last status {state}")


def figure(plot: dict) -> dict:
    assert plot["type"] == "plotly"
    return json.loads(plot["plot"])


def test_the_gpus_choice_shows_only_with_several_cuda_devices(client: Client, api: dict) -> None:
    assert "GPUs" in {p["label"] for p in api["/start"]["parameters"]}  # the handler takes it either way
    [gpus] = [c for c in client.config["components"] if c.get("props", {}).get("label") == "GPUs"]
    assert gpus["props"]["visible"] is (torch.cuda.device_count() > 1)
    message = call(client, api, "/start", **{"Sharded over the GPUs (FSDP)": True, "Run name": "sharded-alone"})[0]
    assert "needs 2 GPUs or more" in message


def test_page_has_the_labelled_controls(api: dict) -> None:
    labels = {p["label"] for p in api["/start"]["parameters"]}
    assert {"Model", "Dataset", "Method", "Rank", "Optimizer bits", "Steps", "Learning rate", "Warm-up steps",
            "Projection gap", "Activation checkpointing", "Layer-wise updates"} <= labels
    method = next(p for p in api["/start"]["parameters"] if p["label"] == "Method")
    assert set(method["type"]["enum"]) == {"full", "lora", "dora", "vera", "galore", "gradnormlorp"}


@pytest.mark.parametrize("changes", [{}, {"Method": "lora", "Rank": 4, "Optimizer bits": 32}])
def test_budget_shows_the_library_estimate(client: Client, api: dict, changes: dict) -> None:
    verdict, chosen, devices = call(client, api, "/budget", **changes)
    cfg = RunConfig.from_yaml(ROOT / "presets" / "tiny-gradnormlorp.yaml", method=changes.get("Method", "gradnormlorp"),
                              rank=changes.get("Rank", 16), optim_bits=changes.get("Optimizer bits", 8))
    expected = estimate(cfg, "rtx-4090")
    fig = figure(chosen)
    unit = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[fig["layout"]["xaxis"]["title"]["text"]]
    shown = {trace["name"]: trace["x"][0] * unit for trace in fig["data"]}
    for part in PARTS:
        assert shown[part.replace("_", " ")] == pytest.approx(expected[part], rel=1e-9, abs=1)
    assert "Fits on RTX 4090" in verdict and "Largest batch that fits" in verdict
    assert [row[0] for row in devices["data"]][0] == "RTX 4090 24 GB"


def test_a_config_only_model_says_it_starts_from_random_weights(client: Client, api: dict) -> None:
    """Llama-3-8B is in the Model list by its config alone: the studio says what training it means, and the budget
    answers for its real size."""
    model = next(p for p in api["/start"]["parameters"] if p["label"] == "Model")
    assert "llama3-8b" in model["type"]["enum"]
    line = client.predict("llama3-8b", api_name="/model_origin")
    assert "Meta-Llama-3-8B" in line and "random weights" in line
    assert "pretrained weights" in client.predict("smollm2", api_name="/model_origin")
    verdict, _, _ = call(client, api, "/budget", Model="llama3-8b")
    cfg = RunConfig.from_yaml(ROOT / "presets" / "tiny-gradnormlorp.yaml", model="llama3-8b")
    assert f"needs {fit(cfg, 'rtx-4090').total_bytes / 2**30:.2f} GiB" in verdict


def test_fit_to_device_fills_the_form_with_the_planners_run(client: Client, api: dict) -> None:
    """The button answers with the library's plan (checked by `estimate`) and puts it in the form's fields."""
    asked = {"Model": "llama3-8b", "Sequence length": 2048, "Batch size": 2, "Rank": 1024}
    message, *values = call(client, api, "/fit_to_device", **asked)
    cfg = RunConfig.from_yaml(ROOT / "presets" / "tiny-gradnormlorp.yaml", model="llama3-8b", seq_len=2048,
                              batch_size=2, rank=1024)
    planned = plan(cfg, "rtx-4090").config
    labels = [p["label"] for p in api["/fit_to_device"]["returns"]][1:]
    filled = dict(zip(labels, values, strict=True))
    assert "Planned for RTX 4090" in message
    assert (filled["Optimizer bits"], filled["Layer-wise updates"], filled["Activation checkpointing"]) == (
        planned.optim_bits, planned.layerwise, planned.grad_checkpointing)
    assert fit(planned, "rtx-4090").total_bytes <= 0.95 * fit(planned, "rtx-4090").device.capacity_bytes
    message, *_ = call(client, api, "/fit_to_device", Model="llama3-8b", Method="full", **{"Sequence length": 8192,
                       "Batch size": 8, "Device": "t4"})
    assert "Nothing fits on T4 16 GB" in message and "over" in message


def test_budget_compares_all_six_methods(client: Client, api: dict) -> None:
    _, plot = call(client, api, "/budget_all_methods")
    fig = figure(plot)
    assert fig["data"][0]["x"] == ["full", "lora", "dora", "vera", "galore", "▶ gradnormlorp"]
    cfg = RunConfig.from_yaml(ROOT / "presets" / "tiny-gradnormlorp.yaml", method="lora")
    unit = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}[fig["layout"]["yaxis"]["title"]["text"]]
    lora_total = sum(trace["y"][1] for trace in fig["data"]) * unit
    assert lora_total == pytest.approx(estimate(cfg, "rtx-4090")["total"], rel=1e-9)


def test_data_preview_shows_the_first_rows_and_the_task(client: Client, api: dict) -> None:
    path = ROOT / "presets" / "data" / "riddles-qa.jsonl"
    _, info, table, *rows = call(client, api, "/preview_data", Dataset="presets/data/riddles-qa.jsonl")
    first = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:5]]
    assert table["headers"] == ["prompt", "response"]
    assert table["value"]["data"] == [[r["prompt"], r["response"]] for r in first]
    assert "data: prompt-response, 104 record(s)" in info and "104 records" in info
    assert {piece["class_or_confidence"] for piece in rows[0]["value"]} == {None, "trained"}  # loss on responses


@pytest.mark.parametrize(("data", "expected"), [
    ("/etc/passwd", "is outside the folders the studio may use"),
    ("presets/data/README.md", "unsupported file type '.md'"),
    ("presets/data/missing.jsonl", "cannot read data file"),
])
def test_bad_dataset_is_a_message_not_a_traceback(client: Client, api: dict, data: str, expected: str) -> None:
    _, message, *_ = call(client, api, "/preview_data", Dataset=data)  # beside the Dataset field, in its preview
    assert expected in message.replace("&#x27;", "'") and "gn-error" in message
    assert "Traceback" not in message
    message = call(client, api, "/start", **{"Dataset": data})[0]
    if "started" in message:  # the run itself reads the file: its one-line error ends the run and shows in the page
        failed = wait_for(client, lambda s: s["status"] not in ("starting", "running", "stopping"))
        assert failed["status"] == "failed" and expected in failed["error"], failed
        message = client.predict(api_name="/refresh")[0]
    assert expected in message.replace("&#x27;", "'") and "Traceback" not in message


def test_bad_settings_are_messages(client: Client, api: dict) -> None:
    message = call(client, api, "/start", **{"Layer-wise updates": True})[0]
    assert "layerwise cannot be combined" in message or "layerwise cannot clip" in message
    with pytest.raises(Exception, match="greater than maximum value 65536"):  # the page shows gradio's range error
        call(client, api, "/budget", Rank=10**6)


def test_upload_lands_in_the_runs_folder(client: Client, tmp_path: Path) -> None:
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    message, dropdown = client.predict(handle_file(data), api_name="/upload_data")
    uploaded = Path(dropdown["value"])
    assert "uploaded mine.jsonl" in message
    assert uploaded.parent.name == "uploads" and uploaded.read_text(encoding="utf-8") == data.read_text()


def test_train_refuse_second_stop_resume_export(client: Client, api: dict, tmp_path: Path) -> None:
    started = call(client, api, "/start", **FAST)[0]
    assert "started" in started, started
    refused = call(client, api, "/start", **FAST)[0]
    assert "already going" in refused

    running = wait_for(client, lambda s: s["train_points"] >= 3)
    run = Path(running["run_dir"])
    _, loss_plot, memory_plot, _, advice, energy_plot, heat_plot, _samples = client.predict(api_name="/refresh")
    spectrum = [json.loads(line) for line in (run / "spectrum.jsonl").read_text().splitlines()]
    assert "would keep 90% of the gradient's energy" in advice  # the default method projects
    refreshes = figure(energy_plot)["data"][0]
    assert refreshes["x"][0] == 1 and refreshes["y"][0] == pytest.approx(
        100 * sum(s["energy_kept"] for s in spectrum if s["step"] == 1) / sum(s["step"] == 1 for s in spectrum))
    assert len(figure(heat_plot)["data"][0]["y"]) == len({s["name"] for s in spectrum})
    on_disk = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in on_disk if "loss" in r}
    drawn = figure(loss_plot)["data"][0]
    assert len(drawn["x"]) >= 3
    assert all(train[step] == pytest.approx(loss) for step, loss in zip(drawn["x"], drawn["y"], strict=True))
    assert figure(memory_plot)["layout"]["title"]["text"] == "Memory"

    assert "stopping" in client.predict(api_name="/stop")
    stopped = wait_for(client, lambda s: s["status"] not in ("starting", "running", "stopping"))
    assert stopped["status"] == "stopped" and stopped["error"] is None, stopped
    assert os.path.exists(f"/proc/{stopped['pid']}") is False
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert checkpoints, "a stopped run keeps a checkpoint"
    steps_at_stop = int(checkpoints[-1].name.split("-")[1])
    assert "no training is running" in client.predict(api_name="/stop")

    resumed = client.predict(run.name, steps_at_stop + 2, api_name="/resume")
    assert "resumed" in resumed, resumed
    done = wait_for(client, lambda s: s["status"] not in ("starting", "running", "stopping"))
    assert done["status"] == "finished", done
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, steps_at_stop + 3))

    message, result, files, download, command = client.predict(run.name, "", False, api_name="/export")
    assert "done" in message, message
    output = Path(result.split(" to ", 1)[1].split("; reloaded", 1)[0])
    assert output == run.parent / "exports" / f"{run.name}-hf"  # each run and format has its own default folder
    assert command.endswith(f"--output {output}") and f"--run {run}" in command
    assert {row[0] for row in files["data"]} >= {"config.json", "model.safetensors"}
    with zipfile.ZipFile(download["value"]) as bundle:  # the Download: the folder as one zip, as the client got it
        assert {name: bundle.read(name) for name in bundle.namelist()} == {
            f"{output.name}/{p.name}": p.read_bytes() for p in output.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(output, local_files_only=True)
    trained = load_file(run / "final" / "model.safetensors")
    for name, tensor in model.state_dict().items():  # gradnormlorp keeps plain weights: nothing to merge
        assert torch.equal(tensor, trained[name]), name
    logits = model(torch.tensor([[1, 5, 9, 13]])).logits
    assert torch.isfinite(logits).all()
    again = client.predict(run.name, "", False, api_name="/export")[0]
    assert "not empty" in again and "Replace a non-empty output folder" in again

    # GGUF q8_0 into its own default folder, beside the HF one: read back by transformers' GGUF loader.
    message, result, files, download, command = client.predict(
        run.name, "", False, "GGUF q8_0 (llama.cpp, Ollama; half the size)", api_name="/export")
    assert "done" in message and "as GGUF" in result and "16 of 16 greedy tokens equal" in result, result
    assert {row[0] for row in files["data"]} == {"Modelfile", "model-q8_0.gguf"}
    gguf_output = output.with_name(f"{run.name}-gguf-q8_0")
    assert command.endswith(f"--output {gguf_output} --format gguf --gguf-type q8_0")
    assert Path(download["value"]).read_bytes() == (gguf_output / "model-q8_0.gguf").read_bytes()
    assert (output / "model.safetensors").is_file()  # the HF export is untouched
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_output, gguf_file="model-q8_0.gguf", local_files_only=True)
    with torch.no_grad():
        gguf_logits = from_gguf(torch.tensor([[1, 5, 9, 13]])).logits
    logits = logits.detach()
    assert (gguf_logits - logits).abs().max() <= GGUF_TOLERANCE["q8_0"] * max(1.0, float(logits.abs().max()))


PROMPT = "The best thing about computers is"
ACTIVE = ("starting", "running", "stopping")


def idle(state: dict) -> bool:
    return state["status"] not in ACTIVE


@pytest.fixture(scope="module")
def tiny_run(client: Client, api: dict):
    """tiny_run(**start_changes) -> a finished run folder, trained through the studio in a few steps (once each)."""
    made: dict[tuple, Path] = {}

    def train(**changes) -> Path:
        key = tuple(sorted(changes.items()))
        if key not in made:
            wait_for(client, idle)
            started = call(client, api, "/start", **{**FAST, "Steps": 4, **changes})[0]
            assert "started" in started, started
            done = wait_for(client, idle)
            assert done["status"] == "finished", done
            made[key] = Path(done["run_dir"])
        return made[key]

    return train


def try_values(api: dict, **by_label) -> list:
    params = api["/try"]["parameters"]
    assert set(by_label) <= {p["label"] for p in params}, by_label
    return [by_label.get(p["label"], p["parameter_default"]) for p in params]


def try_updates(client: Client, api: dict, **by_label) -> list[tuple]:
    """Every update the Try button's stream sent to the page; the last is its final answer."""
    job = client.submit(*try_values(api, **by_label), api_name="/try")
    job.result(timeout=300)
    return job.outputs()


def cli_try(*args) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "gnlorp", "try", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_try_streams_the_cli_s_text_beside_the_base_model(client: Client, api: dict, tiny_run) -> None:
    run = tiny_run()
    settings = {"Max new tokens": 120, "Temperature": 0}
    updates = try_updates(client, api, **{"Model to try": str(run), "Prompt": PROMPT,
                                          "Base model side by side": True, **settings})
    message, trained, base, _ = updates[-1]
    argv = ["--model", run, "--prompt", PROMPT, "--max-new-tokens", 120, "--temperature", 0]
    assert trained + "\n" == cli_try(*argv).stdout  # the CLI ends its stream with a line break
    assert base + "\n" == cli_try(*argv, "--base").stdout
    assert trained != base, "the trained weights changed nothing"
    assert f"trained: run {run}" in message and "base: base model tiny" in message, message
    partial = [update[1] for update in updates[:-1] if update[1]]
    assert all((trained + "\n").startswith(text) for text in partial)  # the stream shows that break until it ends
    assert len(set(partial)) >= 2, "the trained text reached the page in one piece, not streamed"


def test_try_classifier_shows_the_cli_s_label_and_probabilities(client: Client, api: dict, tiny_run) -> None:
    run = tiny_run(Task="seq-cls", Dataset="presets/data/fortunes-topics.jsonl")
    sentence = "Beam me up, Scotty; there is no intelligent life down here."
    assert "a classifier" in client.predict(str(run), api_name="/try_source")[1]
    message, trained, base, chart = try_updates(client, api, **{"Model to try": str(run), "Prompt": sentence,
                                                                "Base model side by side": False})[-1]
    expected = json.loads(cli_try("--model", run, "--text", sentence, "--json").stdout)
    bars = figure(chart)["data"]
    assert [bar["name"] for bar in bars] == ["trained"]
    assert bars[0]["x"] == list(expected["probabilities"])
    assert bars[0]["y"] == pytest.approx(list(expected["probabilities"].values()), abs=1e-6)
    assert trained.startswith(f"{expected['label']} (") and base == ""
    assert expected["model"] in message


def test_try_and_training_refuse_each_other(client: Client, api: dict, tiny_run) -> None:
    run = tiny_run()
    wait_for(client, idle)
    long_try = {"Model to try": str(run), "Prompt": PROMPT, "Max new tokens": 1000, "Temperature": 1,
                "Base model side by side": False}
    job = client.submit(*try_values(api, **long_try), api_name="/try")
    deadline = time.monotonic() + 120
    while not any(update[1] for update in job.outputs()):  # the model is writing
        assert time.monotonic() < deadline and not job.done(), job.outputs()
        time.sleep(0.2)
    refused = call(client, api, "/start", **FAST)[0]
    assert "a model is being tried" in refused and "gn-error" in refused, refused
    assert "stopped" in client.predict(api_name="/try_stop")
    assert "stopped the trained model" in job.result(timeout=60)[0]

    assert "started" in call(client, api, "/start", **FAST)[0]
    message = try_updates(client, api, **long_try)[-1][0]
    assert "a training run is going" in message and "gn-error" in message, message
    assert "stopping" in client.predict(api_name="/stop")
    assert wait_for(client, idle)["status"] == "stopped"
