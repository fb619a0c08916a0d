"""The CPU demo: every optimizer mode learns, the table shows it, and bad input fails cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gnlorp import demo
from gnlorp.cli.main import main

STEPS = 15
ROOT = Path(__file__).resolve().parents[1]


def test_demo_every_mode_learns_and_is_printed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    results: list[demo.ModeResult] = []
    real_run_demo = demo.run_demo

    def recording_run_demo(**kwargs) -> list[demo.ModeResult]:
        results.extend(real_run_demo(**kwargs))
        return results

    monkeypatch.setattr(demo, "run_demo", recording_run_demo)
    assert main(["demo", "--steps", str(STEPS)]) == 0

    printed = capsys.readouterr().out
    assert [r.mode for r in results] == [m.name for m in demo.MODES]
    for r in results:
        assert r.final_loss < r.first_loss, r
        assert r.state_bytes > 0 and r.step_ms > 0, r
        assert r.mode in printed and f"{r.final_loss:.3f}" in printed
    assert len({r.first_loss for r in results}) == 1, "every mode must start from the same model"


def test_demo_state_bytes_show_the_savings() -> None:
    by_mode = {r.mode: r.state_bytes for r in demo.run_demo(steps=2)}
    adamw = by_mode["AdamW 32-bit"]
    for family in ("AdamW", "GaLore", "GradNormLoRP"):
        assert by_mode[f"{family} 8-bit"] < by_mode[f"{family} 32-bit"]
    for family in ("GaLore", "GradNormLoRP"):
        assert by_mode[f"{family} 32-bit"] < adamw / 2


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--steps", "0"],
        ["demo", "--steps", "ten"],
        ["demo", "--rank", "-1"],
        ["demo", "--rank", str(demo.HIDDEN_SIZE + 1)],
        ["demo", "--seed", "-3"],
        ["demo", "--no-such-flag"],
        ["no-such-command"],
        [],
    ],
)
def test_bad_input_is_one_line_without_traceback(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gnlorp", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
