"""The studio with a Hugging Face cache on disk (tests/hub_cache.py) in a real browser (Debian's Chromium, Playwright):
the Model choices list its models with their size on disk, a model cached with its config.json alone is estimated
before any download, and Download pins a cached model to its commit. Offline (HF_HUB_OFFLINE=1): nothing is
downloaded. Skipped where Chromium is missing, except in CI (CI=true).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gnlorp.models import gigabytes
from hub_cache import add_snapshot, tiny_model_files
from test_browser import studio_page, sync_api  # skips this module too where Chromium is missing

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_cached_models_are_choices_and_one_not_downloaded_is_estimated(tmp_path: Path) -> None:
    cache = tmp_path / "hf" / "hub"
    add_snapshot(cache, "acme/tiny-llama", tiny_model_files(tmp_path / "model", seed=0), COMMIT)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=1000, dtype="bfloat16")
    add_snapshot(cache, "acme/config-only", {"config.json": config.to_json_string().encode()}, COMMIT)
    on_disk = sum(path.stat().st_size for path in (cache / "models--acme--tiny-llama" / "blobs").iterdir())
    with torch.device("meta"):
        download = sum(p.numel() for p in LlamaForCausalLM(config).parameters()) * 2  # bfloat16 weights

    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "GNLORP_HUB_DOWNLOADS": "0"}
    with studio_page(tmp_path / "runs", env=env) as page:
        page.get_by_label("Model", exact=True).click()
        sync_api.expect(page.get_by_role("option", name=f"acme/tiny-llama ({gigabytes(on_disk)} on disk)")
                        ).to_be_visible()
        page.get_by_role("option", name="acme/config-only", exact=False).click()
        sync_api.expect(page.locator("#budget-verdict")).to_contain_text(
            f"acme/config-only: not downloaded yet, {gigabytes(download)}", timeout=60_000)
        sync_api.expect(page.locator("#budget-verdict")).to_contain_text("Fits on RTX 4090")
        page.get_by_label("Model", exact=True).click()
        page.get_by_role("option", name="acme/tiny-llama", exact=False).click()
        sync_api.expect(page.locator("#model-origin")).to_contain_text("in the Hugging Face cache")
        page.locator("#model-download").click()  # cached: pinned to its commit with nothing to fetch
        sync_api.expect(page.locator("#setup-message")).to_contain_text(f"downloaded acme/tiny-llama@{COMMIT}")
