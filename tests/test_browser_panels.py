"""The studio's panels in a real browser (Debian's Chromium, Playwright): they follow the run and the form.

A finished run refused by Resume leaves its record as it was; the Gradient spectrum of a projecting run is gone
when a LoRA run (which has none) starts. Skipped where Chromium is missing, except in CI (CI=true).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from studio_process import ENV, ROOT
from test_browser import studio_page, sync_api  # skips this module too where Chromium is missing

SHORT = {"Steps": "6", "Batch size": "2", "Sequence length": "32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs folder holding one finished 3-step run, trained by the CLI before the studio starts."""
    runs = tmp_path_factory.mktemp("panels") / "runs"
    done = subprocess.run([sys.executable, "-m", "gnlorp", "train", "--model", "tiny", "--max-steps", "3",
                           "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "3", "--eval-every", "3",
                           "--output", str(runs / "finished")], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return runs


@pytest.fixture(scope="module")
def page(runs: Path):
    with studio_page(runs) as tab:
        yield tab


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_refuses_a_finished_run_and_leaves_its_record(page, runs: Path) -> None:
    before = files_of(runs / "finished")
    page.get_by_label("Steps", exact=True).fill("3")  # Resume trains to the form's Steps: the run's own count
    page.get_by_role("tab", name="Train").click()
    picker = page.get_by_label("Run to resume")
    picker.fill("finished")
    picker.press("Enter")
    page.get_by_role("button", name="Resume").click()
    message = page.locator("#train-message")
    sync_api.expect(message).to_contain_text("finished at step 3")
    assert "'Steps'" in message.inner_text() and "--max-steps" not in message.inner_text()  # the form's words
    assert files_of(runs / "finished") == before


def _train(page, method: str) -> None:
    page.get_by_role("tab", name="Setup").click()
    page.get_by_role("radio", name=method, exact=True).check()
    for label, value in SHORT.items():
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_role("tab", name="Train").click()
    page.get_by_label("Run name").fill(f"panels-{method}")
    page.get_by_role("button", name="Start").click()
    sync_api.expect(page.locator("#train-message")).to_contain_text(f"started panels-{method}")
    sync_api.expect(page.locator("#train-progress")).to_contain_text(
        re.compile(rf"finished.*panels-{method}|panels-{method}.*finished", re.S), timeout=180_000)


def test_the_spectrum_is_reset_and_hidden_for_a_lora_run(page) -> None:
    _train(page, "gradnormlorp")
    advice = page.locator("#spectrum-advice")
    sync_api.expect(advice).to_contain_text(re.compile(r"rank \d+ would keep 90%"))
    sync_api.expect(page.locator("#spectrum-panel")).to_be_visible()
    _train(page, "lora")
    sync_api.expect(page.locator("#spectrum-panel")).to_be_hidden()
    assert not re.search(r"rank \d+ would keep", advice.inner_text() if advice.count() else "")
