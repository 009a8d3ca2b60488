"""The network view and the convolution playground in a real browser (Playwright + Chromium).

- Draw a digit, click a cell of conv layer 2: the box outlined on the input is summary's receptive
  field, moving by summary's jump from cell to cell; the panel's number is the model's own
  activation (read with a forward hook on the same picture, not from the page's data).
- A residual colour model: an uploaded picture, the addition's cell, a 'same'-padded body conv.
- The playground against torch.nn.Conv2d and layers.py on a grid of settings, misfits included.
- The offline copy (`cnnlab explorer`) opened from disk with no server running.
Tiny random-weight models: what is tested is the arithmetic and the geometry, not accuracy.
"""

from __future__ import annotations

import base64
import itertools
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from .test_browser import CHROMIUM, LiveServer, draw_vertical_stroke, launch, sync_playwright
from .test_serve_network import RESIDUAL, make_bundle
from tests.support.user_digits import save_tiny_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed (pip install 'cnnlab[test]')"),
    pytest.mark.skipif(not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
                       reason=f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"),
]

READY = "document.getElementById('network').dataset.ready === '1'"


def open_page(playwright, url: str):
    browser = launch(playwright)
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    return browser, page, errors


def click_cell(page, node: str, channel: int, row: int, col: int) -> dict:
    """Click the middle of cell (row, col) of one channel's map; the panel's data attributes."""
    holder = page.locator(f".net-column[data-node='{node}'] .map").nth(channel)
    holder.scroll_into_view_if_needed()
    box = holder.locator("canvas").bounding_box()
    _, h, w = page.evaluate(f"window.cnnlabNetwork.state().spec.nodes.find(n => n.id === '{node}').shape")
    page.mouse.click(box["x"] + (col + 0.5) * box["width"] / w, box["y"] + (row + 0.5) * box["height"] / h)
    page.wait_for_function(f"document.getElementById('cell-panel').dataset.node === '{node}' && "
                           f"document.getElementById('cell-panel').dataset.row === '{row}' && "
                           f"document.getElementById('cell-panel').dataset.col === '{col}'")
    return page.eval_on_selector("#cell-panel", "e => ({...e.dataset, text: e.innerText})")


def boxes(page) -> dict[str, tuple[int, ...]]:
    found = page.eval_on_selector_all(".net-column[data-box]", "es => es.map(e => [e.dataset.node, e.dataset.box])")
    return {node: tuple(int(v) for v in box.split(",")) for node, box in found}


def hooked(bundle, png: bytes, module: torch.nn.Module) -> torch.Tensor:
    """`module`'s output for the picture, through the model's own forward pass."""
    from cnnlab.predict import Predictor

    predictor = Predictor(bundle)
    image = predictor.prepare(predictor.load(png))
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.detach()))
    try:
        with torch.no_grad():
            bundle.model(predictor.preprocessing.normalize(image.unsqueeze(0)))
    finally:
        handle.remove()
    return seen["out"][0]


def canvas_png(page) -> bytes:
    url = page.evaluate("document.getElementById('canvas').toDataURL('image/png')")
    return base64.b64decode(url.split(",", 1)[1])


def test_click_a_conv2_cell_box_is_summarys_field_and_value_is_the_models(tmp_path):
    from cnnlab.runs import open_run
    from cnnlab.summarize import summarize

    path = save_tiny_model(tmp_path / "model.safetensors")  # 1 conv 3x3 p1, 2 bn, 3 relu, 4 pool 2, 5 conv 3x3 p0, 6 relu ...
    bundle = open_run(path)
    layer5 = summarize(bundle.layers, bundle.input_shape, 10).layers[4]
    assert layer5.spec.type == "conv" and layer5.receptive_field == (8, 8) and layer5.jump == (2, 2)
    with LiveServer(path) as server, sync_playwright() as playwright:
        browser, page, errors = open_page(playwright, server.url)
        page.wait_for_function("document.querySelectorAll('.net-column').length > 5")
        draw_vertical_stroke(page)
        page.wait_for_function(READY, timeout=20_000)
        page.wait_for_timeout(300)  # the last stroke's answer
        png = canvas_png(page)
        conv2 = hooked(bundle, png, bundle.model.features[4])
        relu2 = hooked(bundle, png, bundle.model.features[5])
        for channel, row, col in ((2, 5, 6), (7, 0, 0), (0, 11, 3)):
            panel = click_cell(page, "5", channel, row, col)
            assert float(panel["value"]) == pytest.approx(float(conv2[channel, row, col]), rel=1e-4, abs=1e-5)
            assert "the same to display precision" in panel["text"]
            found = boxes(page)
            top, left, bottom, right = found["input"]
            # summary's receptive field (8x8) at summary's jump (2); it starts 1 pixel into layer 1's padding
            assert (bottom - top + 1, right - left + 1) == layer5.receptive_field
            assert (top, left) == (row * layer5.jump[0] - 1, col * layer5.jump[1] - 1)
            assert set(found) == {"input", "1", "2", "3", "4", "5"}  # every earlier layer, and the cell itself
            assert found["4"] == (row, col, row + 2, col + 2)      # conv 2's 3x3 window on the pooled maps
        first = boxes(page)["input"]
        click_cell(page, "5", 0, 11, 4)
        assert boxes(page)["input"][1] - first[1] == layer5.jump[1]  # one cell right: one jump right
        panel = click_cell(page, "6", 3, 6, 6)  # conv 2's relu: the panel redoes the conv, then the relu
        assert float(panel["value"]) == pytest.approx(float(relu2[3, 6, 6]), rel=1e-4, abs=1e-5)
        assert "then layer 6 (relu)" in panel["text"]
        pooled = hooked(bundle, png, bundle.model.features[3])  # 4: maxpool 2x2 after batchnorm, relu
        panel = click_cell(page, "4", 1, 7, 6)
        assert float(panel["value"]) == pytest.approx(float(pooled[1, 7, 6]), rel=1e-5, abs=1e-6)
        assert "→ max =" in panel["text"]
        head = page.locator("#net-head").get_attribute("data-predicted")
        probabilities = torch.softmax(hooked(bundle, png, bundle.model.head[-1]), 0)
        assert head == bundle.classes[int(probabilities.argmax())]
        page.click("#clear")
        page.wait_for_function("!document.getElementById('network').dataset.ready")
        assert page.locator("#cell-panel").is_hidden() and errors == []
        browser.close()


def test_residual_colour_model_upload_addition_and_same_padding(tmp_path):
    bundle = make_bundle(RESIDUAL, input_shape=(3, 32, 32))
    from cnnlab.checkpoint import save_model

    path = tmp_path / "residual.safetensors"
    save_model(path, bundle.model, bundle.meta)
    picture = tmp_path / "photo.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(picture)
    block = bundle.model.features[3]  # 4: residual with a conv shortcut
    with LiveServer(path) as server, sync_playwright() as playwright:
        browser, page, errors = open_page(playwright, server.url)
        page.wait_for_function("document.querySelectorAll('.net-column').length > 5")
        roles = page.eval_on_selector_all(".net-column", "es => es.map(e => e.className)")
        assert any("role-body" in r for r in roles) and any("role-shortcut" in r for r in roles)
        page.set_input_files("#file", str(picture))
        page.wait_for_function(READY, timeout=20_000)
        data = picture.read_bytes()
        added = hooked(bundle, data, block)
        panel = click_cell(page, "4", 5, 3, 7)
        assert float(panel["value"]) == pytest.approx(float(added[5, 3, 7]), rel=1e-4, abs=1e-5)
        assert "body (layer 4.4)" in panel["text"] and "shortcut (layer 4.shortcut.2)" in panel["text"]
        same = hooked(bundle, data, block.body[3])  # conv 3x3 padding 'same'
        panel = click_cell(page, "4.4", 1, 0, 15)
        assert float(panel["value"]) == pytest.approx(float(same[1, 0, 15]), rel=1e-4, abs=1e-5)
        assert len(page.locator(".net-column[data-node='input'] .map").all()) == 3  # one map per colour channel
        top, _, bottom, _ = boxes(page)["input"]
        node = page.evaluate("window.cnnlabNetwork.state().spec.nodes.find(n => n.id === '4.4')")
        assert bottom - top + 1 == node["receptive_field"][0] and top == node["start"][0]
        identity = click_cell(page, "5", 0, 2, 2)  # identity shortcut: the block's input
        assert "identity: the block's input" in identity["text"] and "✓" in identity["text"]
        averaged = hooked(bundle, data, bundle.model.features[5])  # 6: avgpool 2x2
        panel = click_cell(page, "6", 4, 3, 1)
        assert float(panel["value"]) == pytest.approx(float(averaged[4, 3, 1]), rel=1e-5, abs=1e-6)
        assert "/ 4 =" in panel["text"]
        assert errors == []
        browser.close()


PADDINGS = [0, 1, 2, "same", "valid"]
MODES = ["zeros", "reflect", "replicate", "circular"]


def torch_size(n, k, s, p, d, mode):
    try:
        conv = torch.nn.Conv2d(1, 1, k, stride=s, padding=p, dilation=d, padding_mode=mode)
        with warnings.catch_warnings():  # 'same' with an even kernel: PyTorch notes it copies the input
            warnings.simplefilter("ignore", UserWarning)
            return conv(torch.zeros(1, 1, n, n)).shape[-1]
    except (RuntimeError, ValueError):
        return None


def cnnlab_answer(n, k, s, p, d, mode):
    from cnnlab.errors import CnnlabError
    from cnnlab.layers import parse_layers, trace

    try:
        infos = trace(parse_layers([{"type": "conv", "out_channels": 1, "kernel_size": k, "stride": s, "padding": p,
                                     "dilation": d, "padding_mode": mode}, "flatten"]), (1, n, n))
    except CnnlabError as exc:
        return None, str(exc).split("): ", 1)[1], ""
    return infos[0].out_shape[1], "", "; ".join(dict.fromkeys(infos[0].warnings))  # one per axis when both say it


def test_playground_agrees_with_torch_and_summary_on_a_grid(tmp_path):
    grid = list(itertools.product([1, 2, 3, 5, 8], [1, 2, 3, 5], [1, 2, 3], PADDINGS, [1, 2], MODES))
    with LiveServer(save_tiny_model(tmp_path / "model.safetensors")) as server, sync_playwright() as playwright:
        browser, page, errors = open_page(playwright, server.url)
        answers = page.evaluate("grid => grid.map(([n, k, s, p, d, m]) => window.cnnlabPlayground.convAxis(n, k, s, p, d, m))",
                                [list(settings) for settings in grid])
        misfits = 0
        for settings, js in zip(grid, answers):
            size = torch_size(*settings)
            out, message, warning = cnnlab_answer(*settings)
            if "error" in js:
                misfits += 1
                assert size is None, (settings, js)            # PyTorch refuses it too
                assert js["error"] == message, settings         # in layers.py's words
            else:
                assert js["out"] == size == out, (settings, js)
                assert js["warning"] == warning, settings
        assert 0 < misfits < len(grid)
        # the page's controls: a misfit is said so; "use this layer" loads layer 1 (conv 3x3, padding 1, 28x28)
        page.fill("#pg-n", "2")
        page.fill("#pg-k", "5")
        page.select_option("#pg-padding-kind", "valid")
        assert page.locator("#pg-result").text_content() == ("does not fit: input 2x2 gives (2 + 2*0 - 5)/1 + 1 = -2; "
                                                             "the feature map would be smaller than 1x1")
        page.wait_for_function("document.getElementById('pg-layer').options.length > 0")
        page.click("#pg-use")
        assert page.locator("#pg-result").text_content() == "output 28×28:  ⌊(28 + 2·1 − 3)/1⌋ + 1 = 28"
        page.click("#pg-step")
        assert errors == []
        browser.close()


def test_offline_copy_works_from_disk_with_no_server(tmp_path):
    from cnnlab.runs import open_run
    from cnnlab.serve.offline import explorer_html
    from tests.support.user_digits import drawn_one

    bundle = open_run(save_tiny_model(tmp_path / "model.safetensors"))
    from cnnlab.predict import Predictor

    predictor = Predictor(bundle)
    one = predictor.prepare(drawn_one())
    page_file = tmp_path / "explorer.html"
    page_file.write_text(explorer_html(bundle, [("a one", one), ("blank", torch.zeros_like(one))]), encoding="utf-8")
    with sync_playwright() as playwright:
        browser, page, errors = open_page(playwright, page_file.as_uri())
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        page.wait_for_function(READY)
        assert page.locator("#net-images button").count() == 2
        with torch.no_grad():
            label = bundle.classes[int(bundle.model(predictor.preprocessing.normalize(one.unsqueeze(0))).argmax())]
        assert page.locator("#net-head").get_attribute("data-predicted") == label
        panel = click_cell(page, "6", 2, 4, 4)
        assert "✓ the same to display precision" in panel["text"]
        page.locator("#net-images button").nth(1).click()
        page.wait_for_function("document.getElementById('cell-panel').dataset.model !== " + repr(panel["model"]))
        page.click("#pg-use")
        assert page.locator("#pg-result").text_content().startswith("output 28×28")
        assert errors == [] and all(url.startswith(("file:", "data:")) for url in requests)
        browser.close()
