"""The studio in a real browser (Debian's Chromium, driven by Playwright): what a person sees and clicks.

Open the page, find the labelled controls, train the default preset (shortened) until the Loss chart has points,
stop, merge and export, and load the exported folder with transformers. Skipped where Chromium is missing,
except in CI (CI=true), where a missing browser is a failure: .ci/run installs it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from studio_process import studio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI") == "true":
        pytest.fail("Chromium is missing: CI must install it (apt-get install chromium chromium-driver)",
                    pytrace=False)
    pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")
sync_api.expect.set_options(timeout=30_000)  # assertions wait for the page; 5 s is too short on a loaded 2-core CI


@contextmanager
def studio_page(runs: Path, width: int = 1280, env: dict[str, str] | None = None, **options) -> Iterator:
    """A Chromium tab on a fresh studio serving `runs` (with `env` added to its environment), once the page has built
    itself (after loading)."""
    with studio(runs, env=env) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        tab = browser.new_page(viewport={"width": width, "height": 1000}, **options)
        tab.set_default_timeout(60_000)
        tab.goto(url)
        tab.locator("#cfg-model").wait_for()
        yield tab
        browser.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with studio_page(tmp_path_factory.mktemp("browser") / "runs", width=1400) as tab:
        yield tab


def test_labelled_controls_and_budget(page) -> None:
    # expect() waits: on a loaded machine the page is still building its controls after the model picker appears.
    for name in ("Model", "Dataset", "Rank", "Steps", "Batch size", "Sequence length"):
        sync_api.expect(page.get_by_label(name, exact=True).first).to_be_attached()
    for name in ("Method", "Optimizer bits"):
        sync_api.expect(page.get_by_text(name, exact=True).first).to_be_attached()
    for method in ("full", "lora", "dora", "vera", "galore", "gradnormlorp"):
        sync_api.expect(page.get_by_role("radio", name=method, exact=True)).to_have_count(1)
    assert page.get_by_role("heading", name="Memory budget").is_visible()
    sync_api.expect(page.locator("#budget-verdict")).to_contain_text("Fits on RTX 4090")
    page.get_by_role("radio", name="full", exact=True).check()
    page.locator("#cfg-optim_bits").get_by_role("radio", name="32", exact=True).check()
    # The all-methods chart is its own event; its first answer pays peft's import (6 s on a loaded CI machine).
    sync_api.expect(page.locator("#budget-compare")).to_contain_text("▶ full", timeout=60_000)
    page.get_by_role("radio", name="gradnormlorp", exact=True).check()
    page.locator("#cfg-optim_bits").get_by_role("radio", name="8", exact=True).check()
    sync_api.expect(page.locator("#data-preview-info")).to_contain_text("records")


def test_train_stop_export(page) -> None:
    page.get_by_label("Steps", exact=True).fill("60")
    page.get_by_label("Batch size", exact=True).fill("4")
    page.get_by_label("Sequence length", exact=True).fill("64")
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Start").click()
    sync_api.expect(page.locator("#train-message")).to_contain_text("started", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#chart-loss .scatterlayer .trace path.js-line').length > 0"
                           " && /step [1-9]/.test(document.querySelector('#train-progress').innerText)",
                           timeout=180_000)
    # The default method projects: its first step refreshed every projector, so the spectrum is drawn.
    sync_api.expect(page.locator("#spectrum-advice")).to_contain_text(
        re.compile(r"rank \d+ would keep 90% of the gradient's energy; rank \d+ keeps \d+%"), timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#chart-energy .scatterlayer .trace').length > 0"
                           " && document.querySelectorAll('#chart-spectrum .heatmaplayer, #chart-spectrum image')"
                           ".length > 0", timeout=30_000)
    page.get_by_role("button", name="Stop").click()
    sync_api.expect(page.locator("#train-progress")).to_contain_text(re.compile(r"\b(stopped|finished)\b"),
                                                                     timeout=120_000)

    page.get_by_role("tab", name="Export").click()
    sync_api.expect(page.locator("#export-cli")).to_contain_text("python -m gnlorp export")
    page.get_by_role("button", name="Merge & export").click()
    result = page.locator("#export-result")
    sync_api.expect(result).to_contain_text("reloaded from disk", timeout=120_000)
    output = re.search(r"to (/\S+); reloaded", result.inner_text()).group(1)
    page.get_by_role("radio", name="GGUF q8_0 (llama.cpp, Ollama; half the size)").check()
    sync_api.expect(page.locator("#export-cli")).to_contain_text("--format gguf --gguf-type q8_0")
    model = AutoModelForCausalLM.from_pretrained(output, local_files_only=True)
    assert torch.isfinite(model(torch.tensor([[1, 7, 42]])).logits).all()


def test_try_panel_shows_generated_text(page) -> None:
    """On the run test_train_stop_export trained: type a prompt, press Try, see the text being written.

    The base model's answer beside it is checked through the API (test_studio.py); leaving it out here halves the time.
    """
    page.get_by_role("tab", name="Export").click()
    sync_api.expect(page.locator("#try-about")).to_contain_text("a language model: type a prompt")
    page.get_by_label("Prompt", exact=True).fill("The best thing about computers is")
    page.get_by_label("Temperature", exact=True).fill("0.8")
    page.get_by_label("Base model side by side").uncheck()
    page.get_by_role("button", name="Try", exact=True).click()
    sync_api.expect(page.locator("#try-trained textarea")).to_have_value(re.compile(r"\S"), timeout=120_000)
    sync_api.expect(page.locator("#try-message")).to_contain_text("trained: run", timeout=120_000)
    assert page.locator("#try-base textarea").input_value() == ""
