"""The Samples panel in a real browser (Debian's Chromium, Playwright): a run started with the studio's default
sampling fills it with the base answers and the latest, and a reloaded page shows them again; the Runs tab shows the
run's perplexity beside its base model's, its samples, and evaluates it. Skipped where Chromium is missing, except in
CI (CI=true)."""

from __future__ import annotations

from test_browser import studio_page, sync_api  # skips this module too where Chromium is missing


def test_the_samples_panel_fills_as_a_run_trains_and_again_after_a_reload(tmp_path) -> None:
    with studio_page(tmp_path / "runs") as page:
        for name, value in {"Steps": "4", "Batch size": "2", "Sequence length": "32"}.items():
            page.get_by_label(name, exact=True).fill(value)
        page.get_by_role("tab", name="Train").click()
        page.get_by_role("button", name="Start").click()
        message = page.locator("#train-message")
        sync_api.expect(message).to_contain_text("started")
        name = message.inner_text().split("started", 1)[1].strip()
        table = page.locator("#samples-table")
        sync_api.expect(page.locator("#train-progress")).to_contain_text("finished", timeout=120_000)
        sync_api.expect(table).to_contain_text("step 4:")  # the studio samples at step 0 and at the end by default
        shown = table.inner_text()[table.inner_text().index("Prompt"):]  # after the refresh timer's "0.1s", if any
        assert "Base" in shown and "Latest" in shown and shown.count("step 0:") == 3, shown

        page.reload()
        page.locator("#cfg-model").wait_for()
        page.get_by_role("tab", name="Train").click()
        sync_api.expect(table).to_contain_text(shown)

        page.get_by_role("tab", name="Runs").click()
        runs_table = page.locator("#runs-table")
        sync_api.expect(runs_table).to_contain_text(name)
        picker = page.locator("#runs-pick input")
        picker.fill(name)
        picker.press("Enter")
        sync_api.expect(page.locator("#runs-samples")).to_contain_text("step 4:")
        page.get_by_role("button", name="Evaluate").click()
        sync_api.expect(page.locator("#runs-message")).to_contain_text("perplexity / base", timeout=120_000)
