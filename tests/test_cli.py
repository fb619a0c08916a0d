"""The CLI end to end, as a user runs it: `python -m gnlorp ...` in a subprocess from the repository root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_model as load_safetensors
from transformers import AutoModelForCausalLM

from gnlorp.config import RunConfig
from gnlorp.models.load import load_model

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
DEMO = ROOT / "presets" / "tiny-gradnormlorp.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
FAST = {"max_steps": 4, "batch_size": 4, "seq_len": 64, "eval_every": 2, "checkpoint_every": 2, "warmup_steps": 1}
METHODS = ["full", "lora", "dora", "vera", "galore", "gradnormlorp"]


def gnlorp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m gnlorp ARGS` from the repository root with one OpenMP thread."""
    return subprocess.run([sys.executable, "-m", "gnlorp", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def flags(values: dict[str, object]) -> list[str]:
    """RunConfig field values as the command-line flags that set them."""
    return [item for name, value in values.items() for item in (f"--{name.replace('_', '-')}", str(value))]


def succeeded(proc: subprocess.CompletedProcess[str]) -> None:
    """Assert exit 0, showing stderr when not."""
    assert proc.returncode == 0, proc.stderr


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Assert a failure reported as exactly one non-empty stderr line without a traceback; return the line."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), proc.stderr
    return lines[0]


def logged_steps(run: Path) -> list[int]:
    """The step of every training line (not eval line) in the run's metrics.jsonl, in file order."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [record["step"] for record in records if "loss" in record]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run of the demo preset, shrunk by flags."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    succeeded(gnlorp("train", "--config", DEMO, "--output", folder, *flags(FAST)))
    return folder


@pytest.fixture(scope="module")
def exported(run: Path) -> Path:
    """The run exported once to a model folder."""
    folder = run.parent / "exported"
    succeeded(gnlorp("export", "--run", run, "--output", folder))
    return folder


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_is_a_valid_run_config(preset: Path) -> None:
    values = yaml.safe_load(preset.read_text())
    assert isinstance(values, dict) and set(values) <= {f.name for f in fields(RunConfig)}
    cfg = RunConfig.from_yaml(preset)
    assert all(getattr(cfg, name) == value for name, value in values.items())


def test_presets_readme_has_one_line_per_preset() -> None:
    readme = (ROOT / "presets" / "README.md").read_text()
    assert all(sum(preset.name in line for line in readme.splitlines()) == 1 for preset in PRESETS)


def test_train_writes_the_yaml_overridden_by_the_flags(run: Path) -> None:
    defaults = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}
    expected = {**defaults, **yaml.safe_load(DEMO.read_text()), **FAST, "output": str(run)}
    assert yaml.safe_load((run / "config.yaml").read_text()) == expected
    assert logged_steps(run) == [1, 2, 3, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["batch_size"] == 4 and summary["seq_len"] == 64


def test_export_gives_a_folder_with_the_trained_logits(run: Path, exported: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "tokenizer.json"} <= names and any(n.endswith(".safetensors") for n in names)
    trained = load_model("tiny", "causal-lm", dtype=torch.float32)
    load_safetensors(trained, run / "final" / "model.safetensors")  # strict: every tensor must fit
    reloaded = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    ids = torch.arange(7, 7 + 2 * 48).reshape(2, 48)
    with torch.no_grad():
        diff = (reloaded.eval()(input_ids=ids).logits - trained.eval()(input_ids=ids).logits).abs().max()
    assert diff <= 1e-4


def test_export_refuses_a_non_empty_output_unless_forced(run: Path, exported: Path) -> None:
    assert "--force" in one_line_error(gnlorp("export", "--run", run, "--output", exported))
    succeeded(gnlorp("export", "--run", run, "--output", exported, "--force"))


def test_methods_lists_the_six_methods() -> None:
    proc = gnlorp("methods")
    succeeded(proc)
    assert [line.split()[0] for line in proc.stdout.strip().splitlines()] == METHODS


def strict_load(text: str) -> object:
    """Parse JSON as strictly as other languages' readers do: NaN and Infinity are not JSON."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def every_json(folder: Path) -> list[object]:
    """Every JSON document in a run folder (.json files, and each line of .jsonl files), strictly parsed."""
    docs = [strict_load(p.read_text()) for p in folder.rglob("*.json")]
    return docs + [strict_load(line) for p in folder.rglob("*.jsonl") for line in p.read_text().splitlines()]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_changes_nothing_and_says_how_to_go_on(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = files_of(copy)
    line = one_line_error(gnlorp("train", "--resume", "--output", copy))
    assert "finished at step 4" in line and "--max-steps" in line, line
    assert files_of(copy) == before  # not a byte written: the summary, metrics and checkpoints are the first run's


def test_resume_continues_a_finished_run_to_the_new_max_steps(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    first = json.loads((copy / "summary.json").read_text())
    succeeded(gnlorp("train", "--resume", "--output", copy, "--max-steps", "8"))
    assert logged_steps(copy) == list(range(1, 9))
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["status"] == "finished"
    # The whole run's facts: both segments listed, wall time summed, the higher peak kept.
    segments = summary["segments"]
    assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 4), (4, 8)]
    assert segments[0]["wall_s"] == first["wall_s"] and segments[0]["peak_mem_bytes"] == first["peak_mem_bytes"]
    assert summary["wall_s"] == pytest.approx(first["wall_s"] + segments[1]["wall_s"])
    assert summary["peak_mem_bytes"] == max(first["peak_mem_bytes"], segments[1]["peak_mem_bytes"])
    every_json(copy)


def test_every_json_a_run_writes_is_strict(run: Path) -> None:
    assert len(every_json(run)) > 5


def test_strict_json_writes_null_with_a_reason_where_a_number_is_not_finite() -> None:
    from gnlorp.atomic import strict_json

    record = {"step": 3, "loss": 2.5, "grad_norm": float("inf"), "nested": [{"x": float("nan")}]}
    parsed = strict_load(strict_json(record))
    assert parsed == {"step": 3, "loss": 2.5, "grad_norm": None, "nested": [{"x": None, "null_because": {
        "x": "not a finite number (nan)"}}], "null_because": {"grad_norm": "not a finite number (inf)"}}
    with pytest.raises(ValueError):
        strict_load(json.dumps(record))  # what the standard library writes by default is not JSON


def test_sigint_stops_a_run_with_a_checkpoint_even_when_started_with_sigint_ignored(tmp_path: Path) -> None:
    """A shell's background job inherits SIGINT ignored; the studio still stops such a run with SIGINT."""
    folder = tmp_path / "run"
    args = flags({**FAST, "max_steps": 100_000, "eval_every": 100_000, "checkpoint_every": 100_000})
    child = subprocess.Popen([sys.executable, "-m", "gnlorp", "train", "--config", DEMO, "--output", folder, *args],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.monotonic() + 240
        while not (folder / "metrics.jsonl").is_file() or len(logged_steps(folder)) < 2:
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, stderr
    summary = json.loads((folder / "summary.json").read_text())
    steps = logged_steps(folder)
    assert summary["status"] == "stopped" and summary["steps"] == steps[-1] < 100_000
    assert [int(c.name.split("-")[1]) for c in (folder / "checkpoints").iterdir()] == [steps[-1]]


def bad_files(tmp: Path) -> dict[str, str]:
    """The files and folders the bad-input cases point at, by placeholder name."""
    broken = tmp / "broken.jsonl"
    broken.write_text('{"text": "one"}\n{"text": "two"}\n{"text": three\n{"text": "four"}\n')
    unknown = tmp / "unknown.yaml"
    unknown.write_text("model: tiny\nlearning_rate: 0.1\n")
    (tmp / "empty").mkdir()
    (tmp / "notarun").mkdir()
    (tmp / "notarun" / "notes.txt").write_text("not a run\n")
    return {"tmp": str(tmp), "out": str(tmp / "out"), "broken": str(broken), "unknown": str(unknown),
            "empty": str(tmp / "empty"), "notarun": str(tmp / "notarun")}


@pytest.mark.parametrize(("args", "named"), [
    pytest.param("train --model /does/not/exist --output {out}", ["/does/not/exist"], id="missing-model"),
    pytest.param("train --data {broken} --output {out}", ["broken.jsonl", "line 3"], id="broken-json"),
    pytest.param("train --rank 0 --output {out}", ["rank"], id="rank-0"),
    pytest.param("train --method nope --output {out}", ["nope", *METHODS], id="unknown-method"),
    pytest.param("train --config {tmp}/missing.yaml --output {out}", ["missing.yaml"], id="missing-config"),
    pytest.param("train --config {unknown} --output {out}", ["learning_rate"], id="unknown-yaml-key"),
    pytest.param("train --lr -1 --output {out}", ["lr", "-1"], id="negative-lr"),
    pytest.param("train --resume --output {empty}", ["resume", "empty"], id="resume-empty-folder"),
    pytest.param("export --run {notarun} --output {out}", ["notarun"], id="export-not-a-run"),
])
def test_bad_input_is_one_line_and_writes_nothing(args: str, named: list[str], tmp_path: Path) -> None:
    argv = args.format(**bad_files(tmp_path)).split()
    line = one_line_error(gnlorp(*argv, *(flags(FAST) if argv[0] == "train" else [])))
    assert all(word in line for word in named), line
    assert not (tmp_path / "out").exists() and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("command", ["train", "data", "estimate", "plan", "export", "try", "demo"])
def test_every_command_prints_its_help(command):
    """--help renders every flag's help text (argparse formats it with %, so a knob's "30%" once crashed it)."""
    proc = gnlorp(command, "--help")
    succeeded(proc)
    assert proc.stdout.startswith(f"usage: gnlorp {command}") or f"gnlorp {command}" in proc.stdout.splitlines()[0]
    if command == "train":
        for f in fields(RunConfig):
            assert f"--{f.name.replace('_', '-')}" in proc.stdout


def test_bitsandbytes_offline_chatter_is_dropped_but_real_warnings_are_not():
    """kernels (>= 0.19) logs a hub-check skip when bitsandbytes is imported offline: one bad-input line must stay
    one line, yet the same logger's other warnings must still reach stderr (filtered by name, not muted)."""
    script = ("import gnlorp, bitsandbytes, logging, sys; "
              "logging.getLogger('kernels._internals.hf_hub').warning('a real kernels warning'); "
              "sys.argv = ['gnlorp', 'train', '--model', '/does/not/exist']; "
              "from gnlorp.cli.main import main; sys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**ENV, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "a real kernels warning", proc.stderr
    assert len(lines) == 2 and "/does/not/exist" in lines[1], proc.stderr
    assert "Skipping publisher trust check" not in proc.stderr
