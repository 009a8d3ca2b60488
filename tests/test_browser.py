"""The drawing page in a real browser: Playwright for Python driving Debian's Chromium.

A real uvicorn server serves a trained MNIST model; the test draws a vertical stroke with the
mouse (and with touch pointer events) and expects the label "1", uploads a picture of a digit and
expects its label, uploads white strokes on a transparent canvas and an empty canvas ("no digit
found" where the answer would be), and checks the clear button, the error shown for a file that
is not an image, the favicon, that no broken-image icon shows before the first answer or after an
error, and the feature maps (signed conv outputs, a note in place of each batchnorm layer). Skips
(with the reason) when Chromium or Playwright is not installed; `.ci/run` installs Chromium with apt.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import mnist_root
from tests.support.user_digits import hard_digit, user_style_digit

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # the test extra is not installed
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install 'cnnlab[test]')"),
    pytest.mark.skipif(not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
                       reason=f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"),
    pytest.mark.skipif(mnist_root() is None, reason="MNIST not found (set CNNLAB_DATA to the folder holding MNIST/raw)"),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """uvicorn serving `create_app(model)` in a background thread."""

    def __init__(self, model_path: Path):
        import uvicorn

        from cnnlab.serve import create_app

        self.port = free_port()
        config = uvicorn.Config(create_app(model_path), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(trained_mnist_run):
    with LiveServer(trained_mnist_run) as server:
        yield server


def launch(playwright):
    executable = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)


def wait_for_label(page, label: str, timeout_ms: int = 20_000) -> None:
    page.wait_for_function(f"document.getElementById('prediction-label').textContent === {label!r}", timeout=timeout_ms)


def draw_vertical_stroke(page) -> None:
    box = page.locator("#canvas").bounding_box()
    x = box["x"] + box["width"] * 0.5
    page.mouse.move(x, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    page.mouse.move(x + box["width"] * 0.02, box["y"] + box["height"] * 0.85, steps=20)
    page.mouse.up()


def touch_vertical_stroke(page) -> None:
    """The same stroke as a finger sends it: pointer events of type 'touch'."""
    box = page.locator("#canvas").bounding_box()
    page.evaluate("""([x, top, bottom]) => {
      const canvas = document.getElementById("canvas");
      const send = (type, y) => canvas.dispatchEvent(new PointerEvent(type, {
        pointerId: 7, pointerType: "touch", isPrimary: true, clientX: x, clientY: y, bubbles: true}));
      send("pointerdown", top);
      for (let i = 1; i <= 20; i++) send("pointermove", top + (bottom - top) * i / 20);
      send("pointerup", bottom);
    }""", [box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.15, box["y"] + box["height"] * 0.85])


def user_style_seven(folder: Path) -> Path:
    """MNIST test image 0 (a 7) as a JPEG photo of dark ink on paper."""
    import torchvision

    test = torchvision.datasets.MNIST(str(mnist_root()), train=False)
    assert int(test.targets[0]) == 7
    data, suffix = user_style_digit(np.asarray(test.data[0]), "jpeg_photo", seed=3)
    path = folder / f"seven{suffix}"
    path.write_bytes(data)
    return path


def white_seven_on_transparency(folder: Path) -> Path:
    """MNIST test image 0 (a 7) in white strokes on a transparent canvas (a dark-mode drawing app's export)."""
    import torchvision

    test = torchvision.datasets.MNIST(str(mnist_root()), train=False)
    data, suffix = hard_digit(np.asarray(test.data[0]), "alpha_white", seed=3)
    path = folder / f"white-seven{suffix}"
    path.write_bytes(data)
    return path


MODEL_INPUT_HIDDEN = ("(() => { const image = document.getElementById('model-input');"
                      " return !image.hasAttribute('src') && getComputedStyle(image).visibility === 'hidden'; })()")


def exercise_page(url: str, folder: Path, screenshot: Path | None = None) -> dict:
    """Draw a '1' with the mouse, clear, draw it with a finger, upload a '7', white strokes on a
    transparent canvas, an empty canvas and a text file; returns what the page showed."""
    seen: dict = {}
    with sync_playwright() as playwright:
        browser = launch(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.wait_for_function("document.getElementById('model-info').textContent.includes('classes')")
        seen["input_hidden_at_start"] = page.evaluate(MODEL_INPUT_HIDDEN)
        seen["favicon"] = page.evaluate("""async () => {
          const link = document.querySelector("link[rel=icon]");
          const response = await fetch(link.href);
          return [response.status, response.headers.get("content-type")];
        }""")

        draw_vertical_stroke(page)
        wait_for_label(page, "1")
        page.wait_for_function("document.querySelectorAll('#feature-maps figure').length > 0")
        page.wait_for_function("document.getElementById('model-input').naturalWidth === 28")
        seen["drawn"] = page.locator("#prediction-label").text_content()
        seen["bars"] = page.locator("#bars .bar").count()
        seen["feature_maps"] = page.locator("#feature-maps figure:not(.skipped)").count()
        seen["skipped"] = page.locator("#feature-maps figure.skipped").all_text_contents()
        seen["first_caption"] = page.locator("#feature-maps figure figcaption").first.text_content()
        if screenshot:
            page.wait_for_timeout(300)  # let the bars' transition finish
            page.screenshot(path=str(screenshot), full_page=True)

        page.click("#clear")
        wait_for_label(page, "–")
        seen["cleared_bars"] = page.locator("#bars .bar").count()

        touch_vertical_stroke(page)
        wait_for_label(page, "1")
        seen["touched"] = page.locator("#prediction-label").text_content()
        page.click("#clear")
        wait_for_label(page, "–")

        page.set_input_files("#file", str(user_style_seven(folder)))
        wait_for_label(page, "7")
        seen["uploaded"] = page.locator("#prediction-label").text_content()
        page.click("#clear")
        wait_for_label(page, "–")
        page.set_input_files("#file", str(white_seven_on_transparency(folder)))
        wait_for_label(page, "7")
        seen["white_on_transparency"] = page.locator("#prediction-label").text_content()

        empty_canvas = folder / "empty-canvas.png"
        Image.new("RGBA", (280, 280), (0, 0, 0, 0)).save(empty_canvas)
        page.set_input_files("#file", str(empty_canvas))
        page.wait_for_function("!document.getElementById('no-digit').hidden")
        seen["no_digit"] = (page.locator("#no-digit").text_content(), page.locator("#status").text_content(),
                            page.locator("#prediction-label").text_content())
        seen["input_hidden_after_no_digit"] = page.evaluate(MODEL_INPUT_HIDDEN)
        if screenshot:
            page.screenshot(path=str(screenshot.with_name(f"{screenshot.stem}-no-digit.png")), full_page=True)

        text_file = folder / "notes.png"
        text_file.write_text("not a picture")
        page.set_input_files("#file", str(text_file))
        page.wait_for_function("document.getElementById('status').textContent.includes('not an image')")
        seen["error"] = page.locator("#status").text_content()
        seen["no_digit_after_error"] = page.locator("#no-digit").is_visible()
        seen["input_hidden_after_error"] = page.evaluate(MODEL_INPUT_HIDDEN)
        seen["page_errors"] = errors
        browser.close()
    return seen


def test_draw_a_one_and_upload_a_seven(live_server, tmp_path):
    seen = exercise_page(live_server.url, tmp_path, tmp_path / "page.png")
    assert seen["drawn"] == "1" and seen["bars"] == 5 and seen["feature_maps"] >= 3
    assert seen["cleared_bars"] == 0 and seen["touched"] == "1"
    assert seen["uploaded"] == "7" and seen["white_on_transparency"] == "7"
    assert "not an image" in seen["error"]
    assert seen["page_errors"] == []
    assert (tmp_path / "page.png").stat().st_size > 10_000
    # No broken-image icon before the first answer, nor after an error.
    assert seen["input_hidden_at_start"] and seen["input_hidden_after_no_digit"] and seen["input_hidden_after_error"]
    assert seen["favicon"][0] == 200 and seen["favicon"][1].startswith("image/svg+xml")
    # Signed conv maps, as the CLI draws them; a note in place of each batchnorm layer of the default net.
    assert "blue" in seen["first_caption"] and "red" in seen["first_caption"]
    assert len(seen["skipped"]) == 3 and all("batchnorm" in text and "not shown" in text for text in seen["skipped"])
    # An empty canvas: "no digit found" where the answer would be, no label.
    message, status, label = seen["no_digit"]
    assert "No digit found" in message and status.startswith("no digit found") and label == "–"
    assert not seen["no_digit_after_error"]
    # The server is still fine after the bad upload.
    import httpx

    assert httpx.get(f"{live_server.url}/health").json()["status"] == "ok"
