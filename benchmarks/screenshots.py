"""Screenshots of each studio tab for README.md, taken in Debian's Chromium with Playwright.

    OMP_NUM_THREADS=1 python benchmarks/screenshots.py   # writes docs/screenshots/{setup,train,runs,export}.png

Trains two short runs of the tiny preset (GradNormLoRP and GaLore) so the charts and the runs overlay have data,
exports the last one and tries it on a prompt beside its base model.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from studio import ROOT, launch

OUT = ROOT / "docs" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
DONE = re.compile(r"\b(finished|stopped|failed)\b")


def train(page, method: str, steps: int) -> None:
    page.get_by_role("tab", name="Setup").click()
    page.get_by_role("radio", name=method, exact=True).check()
    page.get_by_label("Steps", exact=True).fill(str(steps))
    page.get_by_label("Batch size", exact=True).fill("4")
    page.get_by_label("Sequence length", exact=True).fill("64")
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#train-progress")).to_contain_text(method, timeout=120_000)
    expect(page.locator("#train-progress")).to_contain_text(DONE, timeout=600_000)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, launch(Path(tmp) / "runs") as (url, _, _), \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(120_000)
        expect.set_options(timeout=120_000)  # a loaded machine takes longer than expect's default 5 s
        page.goto(url)
        expect(page.locator("#budget-verdict")).to_contain_text("Fits")
        expect(page.locator("#budget-compare .js-plotly-plot")).to_be_visible()
        page.screenshot(path=OUT / "setup.png", full_page=True)

        train(page, "galore", 80)
        train(page, "gradnormlorp", 80)
        page.wait_for_timeout(2500)  # one more chart refresh after the end
        page.screenshot(path=OUT / "train.png", full_page=True)

        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#chart-overlay .scatterlayer .trace").first).to_be_attached()
        page.wait_for_timeout(1000)
        page.screenshot(path=OUT / "runs.png", full_page=True)

        page.get_by_role("tab", name="Export").click()
        page.get_by_role("button", name="Merge & export").click()
        expect(page.locator("#export-result")).to_contain_text("reloaded from disk")
        page.get_by_label("Prompt", exact=True).fill("The best thing about computers is")
        page.get_by_label("Max new tokens", exact=True).fill("40")
        page.get_by_role("button", name="Try", exact=True).click()
        expect(page.locator("#try-message")).to_contain_text("base: base model")
        page.screenshot(path=OUT / "export.png", full_page=True)
        browser.close()
    print(f"wrote {', '.join(sorted(p.name for p in OUT.glob('*.png')))} to {OUT}")


if __name__ == "__main__":
    main()
