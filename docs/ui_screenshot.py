"""The docs' picture of the web app (docs/images/ui.png), from a run: `python docs/ui_screenshot.py` (after `dvc repro`).

Starts `imager ui` on the workspace's trained cascade (history in a temporary folder), makes a few
images through the page in Debian's headless Chromium, and saves docs/images/ui.png.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ui import ui_server  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPTS = ("smiling face with sunglasses", "green apple", "red heart")


def main(out: Path = REPO / "docs" / "images" / "ui.png") -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, ui_server(
        REPO / "data/models/base/model.safetensors", REPO / "data/models/sr/model.safetensors", REPO / "params.yaml", Path(tmp) / "history"
    ) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1150})
        page.set_default_timeout(120_000)
        page.goto(f"{url}/ui/")
        for made, prompt in enumerate(PROMPTS, 1):
            page.fill("#prompt textarea", prompt)
            page.fill("#seed input", "7")
            page.click("#generate")
            page.wait_for_selector("#progress [data-state=done]")
            page.wait_for_function(f"document.querySelectorAll('#history img').length >= {made}")  # refreshed after the run
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(out)


if __name__ == "__main__":
    main()
