"""The Samples panel in a real browser (Debian's Chromium, Playwright): a run started with the studio's default
sampling fills it with the base answers and the latest, and a reloaded page shows them again. Skipped where
Chromium is missing, except in CI (CI=true)."""

from __future__ import annotations

from test_browser import studio_page, sync_api  # skips this module too where Chromium is missing


def test_the_samples_panel_fills_as_a_run_trains_and_again_after_a_reload(tmp_path) -> None:
    with studio_page(tmp_path / "runs") as page:
        for name, value in {"Steps": "4", "Batch size": "2", "Sequence length": "32"}.items():
            page.get_by_label(name, exact=True).fill(value)
        page.get_by_role("tab", name="Train").click()
        page.get_by_role("button", name="Start").click()
        sync_api.expect(page.locator("#train-message")).to_contain_text("started")
        table = page.locator("#samples-table")
        sync_api.expect(page.locator("#train-progress")).to_contain_text("finished", timeout=120_000)
        sync_api.expect(table).to_contain_text("step 4:")  # the studio samples at step 0 and at the end by default
        shown = table.inner_text()
        assert "Base" in shown and "Latest" in shown and shown.count("step 0:") == 3, shown

        page.reload()
        page.locator("#cfg-model").wait_for()
        page.get_by_role("tab", name="Train").click()
        sync_api.expect(table).to_contain_text("step 4:")
        assert table.inner_text() == shown
