"""Security: exposure, file routes, typed paths, planted pickles and secrets, each against a real process.

The studio runs as `python app.py --auth user:PASSWORD` with HF_TOKEN set, as a careful lab would start it;
requests go over HTTP as an attacker's would. A planted pickle writes a marker file when unpickled, so
"not executed" is checked by the marker's absence, next to a control showing the same payload does run
when loaded unsafely.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from gnlorp.config import ConfigError
from studio_process import ENV, ROOT, free_port, studio

TOKEN = "hf_sentinelTOKEN0123456789"
PASSWORD = "sentinel-Passw0rd-9876"
USER = "lab"
LEAKED = "root:x:0:0"  # the first line of /etc/passwd


class Payload:
    """Unpickling this creates `marker` (builtins.open by reference: no shell, no import of ours)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": Payload(marker)}, path)


def test_the_payload_runs_when_loaded_unsafely(tmp_path: Path) -> None:
    """The control: without weights_only this file does run code, so its absence elsewhere means something."""
    import torch

    marker = tmp_path / "pwned"
    plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_torch_is_new_enough_for_safe_loading() -> None:
    import torch
    from packaging.version import Version

    assert Version(torch.__version__.split("+")[0]) >= Version("2.10")
    requirement = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
                       if line.startswith("torch"))
    assert ">=2.10" in requirement


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--host", "::"], ["--host", "192.168.1.7"], ["--share"]])
def test_exposed_without_auth_refuses_to_start(args: list[str]) -> None:
    env = {k: v for k, v in ENV.items() if k != "GNLORP_AUTH"}
    done = subprocess.run([sys.executable, "app.py", "--port", str(free_port()), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert "--auth USER:PASSWORD" in error and "docs/SECURITY.md" in error and "Traceback" not in done.stderr


def test_typed_paths_cannot_leave_the_roots(tmp_path: Path) -> None:
    from ui.paths import PathPolicy

    root = tmp_path / "runs"
    (root / "uploads").mkdir(parents=True)
    (root / "uploads" / "ok.jsonl").write_text("{}\n")
    (root / "uploads" / "link.jsonl").symlink_to("/etc/passwd")
    policy = PathPolicy([root], bases=[tmp_path])
    assert policy.resolve("runs/uploads/ok.jsonl", "Dataset") == (root / "uploads" / "ok.jsonl").resolve()
    for typed in ("/etc/passwd", "runs/../../../etc/passwd", f"{root}/uploads/../../outside.jsonl", "~/.ssh/id_rsa"):
        with pytest.raises(ConfigError, match="outside the folders the studio may use"):
            policy.resolve(typed, "Dataset")
    with pytest.raises(ConfigError, match="is a link to /etc/passwd"):
        policy.resolve("runs/uploads/link.jsonl", "Dataset")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[str, Path]:
    """A studio with a password and a token in its environment, and a symlink planted in its runs folder."""
    runs = tmp_path_factory.mktemp("secure") / "runs"
    (runs / "uploads").mkdir(parents=True)
    (runs / "uploads" / "passwd").symlink_to("/etc/passwd")
    (runs / "exports" / "demo-hf").mkdir(parents=True)  # what the Export tab's Download serves, and a planted link
    (runs / "exports" / "demo-hf.zip").write_bytes(b"PK exported by the lab")
    (runs / "exports" / "passwd").symlink_to("/etc/passwd")
    (runs / "demo" / "final").mkdir(parents=True)  # a run folder: not served
    (runs / "demo" / "config.yaml").write_text("model: tiny\n")
    os.environ["HF_TOKEN"] = TOKEN  # studio_process.ENV was copied at import; the studio gets it below
    ENV["HF_TOKEN"] = TOKEN
    try:
        with studio(runs, "--auth", f"{USER}:{PASSWORD}") as url:
            yield url, runs
    finally:
        os.environ.pop("HF_TOKEN", None)
        ENV.pop("HF_TOKEN", None)


def login(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    response = client.post("login", data={"username": USER, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client


def test_nothing_is_served_without_the_password(lab) -> None:
    url, _ = lab
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        assert anonymous.get("gradio_api/info").status_code == 401
        assert anonymous.get("config").status_code == 401  # the page's layout and every endpoint's name
        assert anonymous.post("login", data={"username": USER, "password": "wrong"}).status_code >= 400
        assert anonymous.post("gradio_api/call/status", json={"data": []}).status_code == 401


def test_file_routes_refuse_traversal(lab) -> None:
    url, runs = lab
    client = login(url)
    uploaded = client.post("gradio_api/upload", files={"files": ("mine.txt", b"hello from the lab")}).json()[0]
    served = client.get(f"gradio_api/file={uploaded}")  # the control: an upload of this session is served
    assert served.status_code == 200 and served.text == "hello from the lab"
    attacks = ["/etc/passwd", "../../../../../../etc/passwd", quote("../../../../../../etc/passwd", safe=""),
               "%2e%2e%2f" * 8 + "etc/passwd", "..%2f" * 8 + "etc/passwd", "%252e%252e%252f" * 8 + "etc/passwd",
               str(runs / "uploads" / "passwd"), str(ROOT / "app.py"), str(ROOT / "requirements.txt"),
               str(runs / ".studio" / "gradio") + "/../../../../../../etc/passwd",
               str(Path(uploaded).parent) + "/../../../../../../../../etc/passwd",
               str(runs / ".studio" / "jobs"), "/proc/self/environ"]
    for route in ("gradio_api/file=", "file=", "gradio_api/file/", "static/", "assets/", "gradio_api/static/"):
        for attack in attacks:
            response = client.get(route + attack)
            assert LEAKED not in response.text and TOKEN not in response.text and "argparse" not in response.text
            if "file" in route:
                assert response.status_code in (400, 403, 404), (route, attack, response.status_code)


def test_only_exports_are_downloadable_from_the_runs_folder(lab) -> None:
    url, runs = lab
    client = login(url)
    served = client.get(f"gradio_api/file={runs / 'exports' / 'demo-hf.zip'}")  # the control: an export is served
    assert served.status_code == 200 and served.content == b"PK exported by the lab"
    with httpx.Client(base_url=url, timeout=60) as anonymous:  # not without the password
        assert anonymous.get(f"gradio_api/file={runs / 'exports' / 'demo-hf.zip'}").status_code == 401
    for path in (runs / "exports" / "passwd", runs / "demo" / "config.yaml", runs / "exports" / ".." / "demo" /
                 "config.yaml", runs / ".studio" / "gradio" / ".." / "jobs", runs / "exports" / "demo-hf"):
        for route in ("gradio_api/file=", "file="):
            response = client.get(f"{route}{path}")
            assert response.status_code in (400, 403, 404), (path, response.status_code)
            assert LEAKED not in response.text and "model: tiny" not in response.text


def test_get_cannot_start_stop_or_export(lab) -> None:
    url, runs = lab
    client = login(url)
    before = sorted(p.name for p in runs.iterdir())
    for name in ("start", "stop", "resume", "export", "upload_data", "save_preset", "try"):
        for path in (f"gradio_api/call/{name}", f"gradio_api/run/{name}", f"gradio_api/api/{name}",
                     f"api/{name}", f"gradio_api/call/{name}?data=[]"):
            assert client.get(path).status_code in (404, 405), path
    assert client.get("gradio_api/queue/join").status_code in (404, 405)
    time.sleep(1)
    assert sorted(p.name for p in runs.iterdir()) == before
    status = client.post("gradio_api/call/status", json={"data": []}).json()["event_id"]
    assert '"idle"' in client.get(f"gradio_api/call/status/{status}").text


def preview(client, typed: str) -> str:
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/preview_data"]
    values = [typed if p["label"] == "Dataset" else p["parameter_default"] for p in api["parameters"]]
    return client.predict(*values, api_name="/preview_data")[1]  # the error shows beside the Dataset field


def test_a_dataset_outside_the_roots_is_a_clear_error(lab) -> None:
    from gradio_client import Client

    url, runs = lab
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    for typed, expected in [("../../../../../etc/passwd", "outside the folders"),
                            (str(runs / "uploads" / "passwd"), "is a link to /etc/passwd")]:
        message = preview(client, typed)
        assert expected in message and "gn-error" in message, message


def test_secrets_are_in_no_file_of_the_runs_folder(lab) -> None:
    from gradio_client import Client

    url, runs = lab
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    values = {p["label"]: p["parameter_default"] for p in api["/start"]["parameters"]}
    values.update({"Run name": "secret-check", "Steps": 3, "Batch size": 4, "Sequence length": 32,
                   "Checkpoint every": 2, "Eval every": 2})
    message = client.predict(*[values[p["label"]] for p in api["/start"]["parameters"]], api_name="/start")[0]
    assert "started" in message, message
    deadline = time.monotonic() + 240
    while client.predict(api_name="/status")["status"] in ("starting", "running", "stopping"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert client.predict(api_name="/status")["status"] == "finished"
    assert "cannot read data file" in preview(client, f"presets/data/missing-{TOKEN}.jsonl")  # echoed, redacted
    files = [p for p in runs.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name == "config.yaml" for p in files) and any(p.parent.name == "jobs" for p in files)
    for path in files:
        data = path.read_bytes()
        assert TOKEN.encode() not in data and PASSWORD.encode() not in data, path


def test_a_planted_pickle_in_a_model_folder_is_not_loaded(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "hidden_size": 16, "intermediate_size": 32,
                                                    "num_attention_heads": 2, "num_hidden_layers": 1,
                                                    "vocab_size": 4096}))
    for tokenizer_file in (ROOT / "gnlorp" / "assets" / "tokenizer").glob("*.json"):
        shutil.copy(tokenizer_file, folder)
    marker = tmp_path / "pwned"
    plant(folder / "pytorch_model.bin", marker)
    done = subprocess.run([sys.executable, "-m", "gnlorp", "train", "--model", str(folder), "--data",
                           str(ROOT / "presets" / "data" / "fortunes.jsonl"), "--output", str(tmp_path / "run"),
                           "--max-steps", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "pickle, unsafe to load" in done.stderr, done.stderr[-2000:]
    assert not marker.exists()


def test_planted_pickles_in_a_run_are_not_executed(tmp_path: Path) -> None:
    """A checkpoint's optimizer.pt swapped for a payload (its manifest rewritten to match, the worst case), and
    pickles dropped beside the weights of final/ and of an export: resume, export and try load none of them."""
    from gnlorp.checkpoint import write_manifest
    from gnlorp.config import RunConfig
    from gnlorp.export import export_run
    from gnlorp.export.infer import load_for_try
    from gnlorp.train.engine import ErrorEvent, TrainingRun

    run, marker = tmp_path / "run", tmp_path / "pwned"
    settings = {"model": "tiny", "data": str(ROOT / "presets" / "data" / "fortunes.jsonl"), "batch_size": 4,
                "seq_len": 32, "checkpoint_every": 2, "eval_every": 100, "output": str(run)}
    assert TrainingRun(RunConfig.from_dict({**settings, "max_steps": 2})).run() is not None
    checkpoint = run / "checkpoints" / "step-000002"
    plant(checkpoint / "optimizer.pt", marker)
    (checkpoint / "manifest.json").unlink()
    write_manifest(checkpoint, step=2, cfg=RunConfig.from_dict({**settings, "max_steps": 2}))

    resumed = TrainingRun(RunConfig.from_dict({**settings, "max_steps": 4}), resume=True)
    assert resumed.run() is None
    events = list(resumed.events.queue)
    error = events[-1]
    assert isinstance(error, ErrorEvent) and not error.internal, error
    assert "no intact checkpoint" in error.message and "step-000002: refused to load it" in error.message
    assert not marker.exists()

    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        plant(run / "final" / name, marker)
    exported = export_run(run, tmp_path / "export")
    plant(exported.output / "pytorch_model.bin", marker)
    for source in (run, exported.output):
        text = "".join(load_for_try(source, device="cpu").generate("Life is", max_new_tokens=3, temperature=0))
        assert isinstance(text, str)
    assert not marker.exists()
    (exported.output / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="pickle, unsafe to load"):
        load_for_try(exported.output, device="cpu")
    assert not marker.exists()
