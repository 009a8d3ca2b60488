"""The page's Grad-CAM overlay in a real browser (Playwright + Chromium): off by default; switched
on, it lies over "what the model sees" for the drawn digit and follows new drawings; switched off
or cleared, it goes away. A tiny random-weight model is enough: the overlay is what is tested."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .test_browser import CHROMIUM, LiveServer, draw_vertical_stroke, launch, sync_playwright
from tests.support.user_digits import save_tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install 'cnnlab[test]')"),
    pytest.mark.skipif(not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
                       reason=f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"),
]
pytest.importorskip("captum", reason="the explain extra (captum) is not installed")

OVERLAY_SHOWN = "!document.getElementById('explain-overlay').hidden"


def test_gradcam_overlay_switches_on_and_off(tmp_path):
    model = save_tiny_model(tmp_path / "model.safetensors")
    with LiveServer(model) as server, sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        explained: list[str] = []
        page.on("request", lambda request: explained.append(request.url) if "/explain?" in request.url else None)
        page.goto(server.url)
        page.wait_for_function("document.getElementById('model-info').textContent.includes('classes')")

        draw_vertical_stroke(page)  # switched off: no explanation is asked for
        page.wait_for_function("document.getElementById('model-input').naturalWidth === 28")
        assert page.locator("#explain-overlay").is_hidden() and explained == []

        page.check("#explain-toggle")  # on: the current drawing is explained at once
        page.wait_for_function(OVERLAY_SHOWN, timeout=20_000)
        page.wait_for_function("document.getElementById('explain-overlay').naturalWidth === 28")
        assert "Grad-CAM for" in page.locator("#explain-note").text_content()
        overlay, seen = page.locator("#explain-overlay").bounding_box(), page.locator("#model-input").bounding_box()
        assert all(abs(overlay[k] - seen[k]) < 1 for k in ("x", "y", "width", "height"))  # exactly on the input
        page.screenshot(path=str(tmp_path / "overlay.png"))

        page.uncheck("#explain-toggle")
        page.wait_for_function(f"!({OVERLAY_SHOWN})")
        page.check("#explain-toggle")
        page.wait_for_function(OVERLAY_SHOWN, timeout=20_000)
        page.click("#clear")
        page.wait_for_function(f"!({OVERLAY_SHOWN})")
        assert page.locator("#explain-note").text_content() == ""
        assert errors == [] and len(explained) >= 2
        browser.close()
