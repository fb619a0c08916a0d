"""--report-to tensorboard: the event files, read back by TensorBoard's own reader, hold metrics.jsonl's numbers.

The reference is the run's metrics.jsonl, written separately; TensorBoard stores scalars as float32, so each
value is compared after the same rounding, at its step and wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gnlorp.config import RunConfig
from gnlorp.train.engine import ErrorEvent, WarningEvent
from test_faults import train as train_tiny

ROOT = Path(__file__).resolve().parents[1]
TENSORBOARD = {"update_proj_gap": 2, "eval_every": 3, "checkpoint_every": 3, "report_to": "tensorboard"}
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
        "grad_energy_kept": "train/grad_energy_kept", "mem_bytes": "memory/mem_bytes",
        "peak_mem_bytes": "memory/peak_mem_bytes", "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy"}


def train(output: Path, resume: bool = False, **overrides) -> tuple[dict, list]:
    """test_faults' in-process tiny run, with TensorBoard on and checkpoints and evals every 3 steps."""
    summary, events = train_tiny(output, resume, **{**TENSORBOARD, **overrides})
    assert summary is not None, [e for e in events if isinstance(e, ErrorEvent)]
    return summary, events


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events_of(run: Path) -> EventAccumulator:
    reader = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    return reader.Reload()


def assert_events_match_metrics(run: Path) -> EventAccumulator:
    """Every number of metrics.jsonl, and nothing else, as a scalar at its step (and wall time, where it has one)."""
    reader, lines = events_of(run), records(run)
    expected = {tag: [(r["step"], float(np.float32(r[key])), r["time"]) for r in lines if r.get(key) is not None]
                for key, tag in TAGS.items()}
    expected["warnings/count"] = [(r["step"], float(n)) for n, r in enumerate((r for r in lines if "warning" in r), 1)]
    expected = {tag: points for tag, points in expected.items() if points}
    assert set(reader.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        logged = [(e.step, e.value, e.wall_time)[:len(points[0])] for e in reader.Scalars(tag)]
        assert logged == points, tag
    return reader


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_scalars_equal_metrics_jsonl_and_a_resume_continues_from_its_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, max_steps=6)
    assert RunConfig.from_yaml(run / "config.yaml").report_to == "tensorboard"
    reader = assert_events_match_metrics(run)
    assert [e.step for e in reader.Scalars("eval/loss")] == [3, 6]
    assert {"train/grad_energy_kept", "memory/mem_bytes", "memory/peak_mem_bytes"} <= set(reader.Tags()["scalars"])

    # A damaged newest checkpoint: the run resumes from step 3, redoes 4-6 and goes on to 9, with one warning.
    flip_byte(run / "checkpoints" / "step-000006" / "model.safetensors")
    _, events = train(run, resume=True, max_steps=9)
    assert [e.step for e in events if isinstance(e, WarningEvent)] == [3]
    reader = assert_events_match_metrics(run)  # steps 4-6 once each: the first run's events did not stay
    assert [e.step for e in reader.Scalars("train/loss")] == list(range(1, 10))
    assert [e.step for e in reader.Scalars("eval/loss")] == [3, 6, 9]
    assert [(e.step, e.value) for e in reader.Scalars("warnings/count")] == [(3, 1.0)]
    message = reader.Tensors("warnings/message/text_summary")  # add_text appends /text_summary
    assert [e.step for e in message] == [3]
    assert "skipped a damaged checkpoint" in message[0].tensor_proto.string_val[0].decode()


def test_a_classifier_logs_its_eval_accuracy(tmp_path: Path) -> None:
    train(tmp_path, task="seq-cls", data="presets/data/fortunes-topics.jsonl", max_steps=2, eval_every=1)
    reader = assert_events_match_metrics(tmp_path)
    assert [e.step for e in reader.Scalars("eval/accuracy")] == [1, 2]


def test_report_to_defaults_to_none_and_writes_no_event_files(tmp_path: Path) -> None:
    assert RunConfig().report_to == "none"
    train(tmp_path, max_steps=1, report_to="none")
    assert (tmp_path / "metrics.jsonl").is_file() and not (tmp_path / "tensorboard").exists()


PATCHED_CLI = ("import importlib.util, sys; find = importlib.util.find_spec; "
               "importlib.util.find_spec = lambda name, *a: None if name == 'tensorboard' else find(name, *a); "
               "from gnlorp.cli.main import main; sys.exit(main())")


def test_without_the_package_the_cli_says_how_to_install_it_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", PATCHED_CLI, "train", "--report-to", "tensorboard", "--output",
                           str(out)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'gnlorp[tensorboard]'" in lines[0], proc.stderr
    assert not out.exists()
