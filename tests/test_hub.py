"""Models and datasets by their Hugging Face Hub id, from a Hugging Face cache built on disk as huggingface_hub lays
it out (tests/hub_cache.py), with HF_HUB_OFFLINE=1: nothing is downloaded. The references are the files in that
cache (the snapshot's safetensors, the commit a branch names, the blobs' sizes), never gnlorp's own answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import hf_raise_for_status
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp.config import ConfigError
from gnlorp.data import parse_dataset_id
from gnlorp.models import cached_models, load_model, parse_hub_id, pin
from gnlorp.models.hub import HubId, hub_errors
from gnlorp.models.load import load_model_config
from hub_cache import add_snapshot, text_dataset_files, tiny_model_files

ROOT = Path(__file__).resolve().parents[1]
MODEL, DATA = "acme/tiny-llama", "acme/tiny-text"
MAIN, OLDER = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"older").hexdigest()
TOKEN = "hf_fakeTokenThatMustNeverBeWritten0123456789"
FAST = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--checkpoint-every", "2",
        "--warmup-steps", "0"]


def blobs_bytes(repo_folder: Path) -> int:
    return sum(path.stat().st_size for path in (repo_folder / "blobs").iterdir())


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HF_HOME holding two commits of a tiny LLaMA (main and an older one), a repository cached with its config.json
    alone (as an estimate leaves it), one that needs remote code, and a one-file text dataset."""
    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "hf" / "hub"
    add_snapshot(cache, MODEL, tiny_model_files(tmp / "main", seed=0), MAIN)
    add_snapshot(cache, MODEL, tiny_model_files(tmp / "older", seed=1), OLDER, ref=None)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=1000, dtype="bfloat16")
    add_snapshot(cache, "acme/config-only", {"config.json": config.to_json_string().encode()}, MAIN)
    remote = {"model_type": "acme-net", "auto_map": {"AutoConfig": "configuration_acme.AcmeConfig"}}
    add_snapshot(cache, "acme/remote-code", {"config.json": json.dumps(remote).encode()}, MAIN)
    add_snapshot(cache, DATA, text_dataset_files(), MAIN, kind="datasets")
    return tmp / "hf"


@pytest.fixture
def offline(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process's huggingface_hub on the test cache, offline as HF_HUB_OFFLINE=1 at its import makes it."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("GNLORP_HUB_DOWNLOADS", raising=False)  # set when gnlorp, not the user, chose offline
    return home / "hub"


def gnlorp(home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m gnlorp ARGS` with HF_HOME on the test cache, HF_HUB_OFFLINE=1 and a token in the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("GNLORP_HUB_DOWNLOADS", "HF_HUB_CACHE")}
    env |= {"OMP_NUM_THREADS": "1", "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN,
            "HF_DATASETS_CACHE": str(home / "datasets")}
    return subprocess.run([sys.executable, "-m", "gnlorp", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_hub_ids_are_told_from_paths_and_presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == HubId("Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_hub_id("meta-llama/Llama-3.2-1B@v1.0") == HubId("meta-llama/Llama-3.2-1B", "v1.0")
    for name in ("tiny", "/abs/folder", "./org/name", "~/org/name", "a/b/c", "org//name", "org/na me"):
        assert parse_hub_id(name) is None, name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    assert parse_hub_id("runs/mine") is None  # an existing folder stays a folder
    assert parse_dataset_id("acme/text@v2:validation") == (HubId("acme/text", "v2"), "validation")
    assert parse_dataset_id("data/missing.jsonl") is None  # a mistyped file path is not looked up on the Hub


def test_train_export_try_by_id_offline_pins_the_commit_and_writes_no_token(home: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = gnlorp(home, "train", "--model", MODEL, "--data", f"{DATA}:train", "--method", "lora",
                     "--output", run, *FAST)
    assert trained.returncode == 0, trained.stderr
    assert "40 record(s)" in trained.stderr  # every line of the dataset's train.jsonl
    config = (run / "config.yaml").read_text()
    assert f"model: {MODEL}@{MAIN}\n" in config  # the commit refs/main names
    files = [path for path in run.rglob("*") if path.is_file()]
    assert files and not [path for path in files if TOKEN.encode() in path.read_bytes()]

    exported = gnlorp(home, "export", "--run", run, "--output", tmp_path / "export")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "export" / "config.json").is_file()

    tried = gnlorp(home, "try", "--model", MODEL, "--prompt", "Line", "--temperature", "0", "--max-new-tokens", "3",
                   "--json")
    assert tried.returncode == 0, tried.stderr
    assert MAIN in json.loads(tried.stdout.strip().splitlines()[-1])["model"]


def test_estimate_reads_the_config_alone(home: Path) -> None:
    proc = gnlorp(home, "estimate", "--model", "acme/config-only", "--method", "full", "--json")
    assert proc.returncode == 0, proc.stderr
    config = json.loads((home / "hub" / "models--acme--config-only" / "snapshots" / MAIN / "config.json").read_text())
    with torch.device("meta"):
        reference = LlamaForCausalLM(LlamaConfig(**config))
    assert json.loads(proc.stdout)["trainable_params"] == sum(p.numel() for p in reference.parameters())


def test_a_revision_pin_loads_that_commit(offline: Path) -> None:
    snapshots = offline / "models--acme--tiny-llama" / "snapshots"
    for commit in (MAIN, OLDER):
        model = load_model(f"{MODEL}@{commit}", "causal-lm")
        state = model.state_dict()
        saved = load_file(snapshots / commit / "model.safetensors")
        assert all(torch.equal(state[name], tensor) for name, tensor in saved.items()), commit
    assert not torch.equal(load_file(snapshots / MAIN / "model.safetensors")["lm_head.weight"], saved["lm_head.weight"])
    assert pin(MODEL) == f"{MODEL}@{MAIN}"
    assert pin(f"{MODEL}@{OLDER}") == f"{MODEL}@{OLDER}"


@pytest.mark.parametrize(("name", "expected"), [
    ("acme/not-cached", ["not in the Hugging Face cache", "HF_HUB_OFFLINE is set", "download"]),
    (f"{MODEL}@v9", ["not in the Hugging Face cache", "HF_HUB_OFFLINE is set"]),
    ("acme/config-only", ["without its weights", "HF_HUB_OFFLINE is set"]),
    ("acme/remote-code", ["runs its own code", "trust_remote_code"]),
])
def test_what_cannot_load_says_why_in_one_line(offline: Path, name: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as error:
        load_model(name, "causal-lm")
    message = str(error.value)
    assert "\n" not in message and name.partition("@")[0] in message
    assert all(part in message for part in expected), message


@pytest.mark.parametrize(("status", "code", "expected"), [
    (401, "GatedRepo", ["is gated", f"huggingface.co/{MODEL}", "HF_TOKEN", "hf auth login"]),
    (401, "RepoNotFound", ["no model", "check the spelling", "HF_TOKEN"]),
    (404, "RevisionNotFound", ["has no revision 'v9'", "branch, tag or commit"]),
])
def test_the_hubs_refusals_are_one_line_each(status: int, code: str, expected: list[str]) -> None:
    """The Hub's answers as huggingface_hub itself classifies them (by their X-Error-Code) into its exceptions."""
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{MODEL}/revision/v9")
    response = httpx2.Response(status, headers={"X-Error-Code": code}, request=request)
    with pytest.raises(ConfigError) as error, hub_errors(HubId(MODEL, "v9")):
        hf_raise_for_status(response)
    message = str(error.value)
    assert "\n" not in message and MODEL in message and TOKEN not in message
    assert all(part in message for part in expected), message


def test_cached_models_are_listed_with_their_size_on_disk(offline: Path) -> None:
    listed = dict(cached_models())
    assert listed[MODEL] == blobs_bytes(offline / "models--acme--tiny-llama")
    assert listed["acme/config-only"] == blobs_bytes(offline / "models--acme--config-only")
    assert DATA not in listed  # datasets are not models
    assert load_model_config("acme/config-only", "causal-lm").num_hidden_layers == 3
