"""Managing runs in a real browser (Debian's Chromium, driven by Playwright), in a 1280-pixel-wide window.

Export one run as a Hugging Face folder and then as GGUF q8_0, each to its own default folder, and download each
through the browser; delete a run (Cancel keeps it, Confirm removes it) and rename one; Stop is enabled only while a
run goes. The runs are a 4-step CLI training and copies of it; what the page says is checked against the folders on
disk, the downloaded bytes, and transformers loading the downloaded model.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from studio_process import ENV, ROOT
from test_browser import studio_page, sync_api

expect = sync_api.expect
HF, Q8 = "Hugging Face folder", "GGUF q8_0 (llama.cpp, Ollama; half the size)"
WIDTH = 1280


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """alpha: a finished 4-step tiny run from the CLI; beta and gamma: copies of it, each pointing at its own folder."""
    runs = tmp_path_factory.mktemp("browser-runs") / "runs"
    subprocess.run([sys.executable, "-m", "gnlorp", "train", "--model", "tiny", "--max-steps", "4", "--seq-len", "32",
                    "--batch-size", "2", "--checkpoint-every", "2", "--output", str(runs / "alpha")], cwd=ROOT,
                   env=ENV, check=True, capture_output=True, timeout=300)
    for name in ("beta", "gamma"):
        shutil.copytree(runs / "alpha", runs / name)
        cfg = yaml.safe_load((runs / name / "config.yaml").read_text())
        (runs / name / "config.yaml").write_text(yaml.safe_dump({**cfg, "output": str(runs / name)}, sort_keys=False))
    return runs


@pytest.fixture(scope="module")
def page(runs: Path):
    with studio_page(runs, width=WIDTH, accept_downloads=True) as tab:
        yield tab


# Records what the export section shows at every change of the page (message, result, whether the files table
# lists model.safetensors, whether the Download is shown), so a state that lasts a moment is not missed.
WATCH = """() => {
    window.exportStates = [];
    const text = (id) => (document.querySelector(id)?.innerText ?? "").trim();
    const record = () => {
        const button = document.querySelector("#export-download");
        window.exportStates.push([text("#export-message"), text("#export-result"),
                                  text("#export-files").includes("model.safetensors"),
                                  !!button && button.offsetParent !== null]);
    };
    new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                         attributes: true});
}"""


def pick(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def download(page, tmp_path: Path) -> Path:
    with page.expect_download() as started:
        page.locator("#export-download").click()
    got = started.value
    target = tmp_path / got.suggested_filename
    got.save_as(target)
    return target


def test_export_hf_then_gguf_each_to_its_folder_and_download_both(page, runs: Path, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Export").click()
    pick(page, "export-run", "alpha")
    output, form = page.locator("#export-output textarea, #export-output input").first, page.locator("#export-format")
    expect(output).to_have_attribute("placeholder", str(runs / "exports" / "alpha-hf"))
    expect(form).to_contain_text("loads with transformers")
    page.get_by_role("radio", name=Q8).check()
    expect(output).to_have_attribute("placeholder", str(runs / "exports" / "alpha-gguf-q8_0"))
    expect(form).to_contain_text("8-bit (q8_0) weights")
    expect(form).to_contain_text("Modelfile")
    page.get_by_role("radio", name=HF).check()
    expect(form).to_contain_text("loads with transformers")

    result, message, button = page.locator("#export-result"), page.locator("#export-message"), \
        page.locator("#export-download")
    page.get_by_role("button", name="Merge & export").click()
    hf = runs / "exports" / "alpha-hf"
    expect(result).to_contain_text(f"to {hf}; reloaded from disk", timeout=180_000)
    expect(button).to_contain_text(re.compile(r"Download alpha-hf\.zip \(\d+\.\d\d MiB\)"))
    archive = download(page, tmp_path)
    with zipfile.ZipFile(archive) as bundle:
        assert {"alpha-hf/config.json", "alpha-hf/model.safetensors"} <= set(bundle.namelist())
        bundle.extractall(tmp_path / "unzipped")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "unzipped" / "alpha-hf", local_files_only=True)
    on_disk = load_file(hf / "model.safetensors")
    assert all(torch.equal(tensor, on_disk[name]) for name, tensor in model.state_dict().items())
    assert torch.isfinite(model(torch.tensor([[1, 7, 42]])).logits).all()

    page.get_by_role("radio", name=Q8).check()
    page.evaluate(WATCH)
    page.get_by_role("button", name="Merge & export").click()
    gguf = runs / "exports" / "alpha-gguf-q8_0"
    expect(result).to_contain_text(f"to {gguf} as GGUF", timeout=180_000)
    # While the second export ran (a second or so for this model), the first one's result, files and download were gone.
    seen = page.evaluate("window.exportStates")
    assert ["Exporting alpha as " + Q8 + "…", "", False, False] in seen, seen
    expect(message).to_contain_text("done")
    expect(button).to_contain_text(re.compile(r"Download model-q8_0\.gguf \(\d+\.\d\d MiB\)"))
    got = download(page, tmp_path)
    assert got.stat().st_size == (gguf / "model-q8_0.gguf").stat().st_size
    assert got.read_bytes() == (gguf / "model-q8_0.gguf").read_bytes()
    assert (hf / "model.safetensors").is_file() and (runs / "exports" / "alpha-hf.zip").is_file()

    page.get_by_role("button", name="Merge & export").click()  # again: its folder is no longer empty
    expect(message).to_contain_text("is not empty")
    expect(result).to_have_text("")
    expect(button).to_be_hidden()


def test_the_runs_table_fits_1280_pixels(page, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Runs").click()
    expect(page.locator("#runs-table")).to_contain_text("gamma")
    page.screenshot(path=tmp_path / "runs-1280.png", full_page=True)
    cells = page.evaluate("() => [...document.querySelectorAll('#runs-table th')].map(th => {"
                          " const r = th.getBoundingClientRect(); return [th.innerText, r.right, r.height]; })")
    assert [c[0].strip() for c in cells][:3] == ["run", "status", "model"], cells
    assert all(right <= WIDTH and height < 80 for _, right, height in cells), cells  # 80 px: at most 2-3 lines
    widths = page.evaluate("() => { const t = document.querySelector('#runs-table table');"
                           " return [t.scrollWidth, t.clientWidth]; }")
    assert widths[0] <= widths[1], widths


def test_delete_asks_first_and_rename_shows_the_new_name(page, runs: Path) -> None:
    page.get_by_role("tab", name="Runs").click()
    table, message = page.locator("#runs-table"), page.locator("#runs-message")
    confirm = page.locator("#runs-confirm")
    expect(table).to_contain_text("beta")
    table.get_by_text("beta", exact=True).click()
    expect(page.locator("#runs-pick input")).to_have_value("beta")
    page.get_by_role("button", name="Delete", exact=True).click()
    expect(confirm).to_be_visible()
    expect(confirm).to_contain_text(f"Really delete beta? Its folder {runs / 'beta'}")
    page.get_by_role("button", name="Cancel").click()
    expect(confirm).to_be_hidden()
    expect(message).to_contain_text("kept beta")
    assert (runs / "beta" / "config.yaml").is_file()
    expect(table).to_contain_text("beta")

    page.get_by_role("button", name="Delete", exact=True).click()
    page.get_by_role("button", name="Confirm delete").click()
    expect(message).to_contain_text("deleted beta")
    expect(confirm).to_be_hidden()
    expect(table).not_to_contain_text("beta")
    assert not (runs / "beta").exists()

    table.get_by_text("gamma", exact=True).click()
    expect(page.locator("#runs-pick input")).to_have_value("gamma")
    page.get_by_label("New name").fill("alpha")
    page.get_by_role("button", name="Rename").click()
    expect(message).to_contain_text("a run named 'alpha' already exists")
    page.get_by_label("New name").fill("delta")
    page.get_by_role("button", name="Rename").click()
    expect(message).to_contain_text("renamed gamma to delta")
    expect(table).to_contain_text("delta")
    expect(table).not_to_contain_text("gamma")
    assert not (runs / "gamma").exists()
    assert yaml.safe_load((runs / "delta" / "config.yaml").read_text())["output"] == str(runs / "delta")


def test_stop_is_enabled_only_while_a_run_goes(page, runs: Path) -> None:
    page.get_by_role("tab", name="Setup").click()
    page.get_by_label("Steps", exact=True).fill("100000")
    page.get_by_label("Batch size", exact=True).fill("2")
    page.get_by_label("Sequence length", exact=True).fill("32")
    page.get_by_role("tab", name="Train").click()
    stop = page.locator("#train-stop")
    expect(stop).to_be_disabled()
    page.get_by_label("Run name").fill("long")
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#train-message")).to_contain_text("started long")
    expect(stop).to_be_enabled(timeout=60_000)
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"step [1-9]"), timeout=180_000)
    stop.click()
    expect(stop).to_be_disabled()
    expect(page.locator("#train-progress")).to_contain_text(re.compile(r"\bstopped\b"), timeout=120_000)
    expect(stop).to_be_disabled()

    page.get_by_label("Run to resume").click()  # its choices are read when it opens
    expect(page.get_by_role("option", name="long", exact=True)).to_be_visible()
    assert (runs / "alpha" / "checkpoints").is_dir()  # alpha has checkpoints too, but it finished: not offered
    expect(page.get_by_role("option", name="alpha", exact=True)).to_have_count(0)
    page.keyboard.press("Escape")
