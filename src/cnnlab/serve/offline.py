"""The network view as one self-contained HTML file: no server, no network, a few images baked in.

The page is the server's own: the network and playground sections of `static/index.html`
(between its `network view` markers), `style.css`, `network.js` and `playground.js` inlined, and
`window.CNNLAB_OFFLINE` holding `network_spec` and `network_activations` for each image. A
teacher can mail it; it opens from disk in any browser.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from ..errors import CnnlabError
from ..network_view import network_activations, network_spec

STATIC = Path(__file__).resolve().parent / "static"
START, END = "<!-- network view", "<!-- /network view -->"


def _sections() -> str:
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    start, end = page.index(START), page.index(END)
    return page[page.index("\n", start) + 1:end]


def _script(text: str) -> str:
    # "</" would end the <script> element early when a class name or a file holds it
    return "<script>\n" + text.replace("</", "<\\/") + "\n</script>"


def explorer_html(bundle, images: list[tuple[str, torch.Tensor]], title: str | None = None) -> str:
    """The page for `bundle` with `images` ((name, uint8 (C, H, W)) pairs) baked in."""
    spec = network_spec(bundle, title)
    baked = [{"name": name, "activations": network_activations(bundle, image, spec)} for name, image in images]
    data = json.dumps({"spec": spec, "images": baked}, separators=(",", ":"))
    c, h, w = bundle.input_shape
    name = html.escape(spec["name"])
    return "\n".join([
        "<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cnnlab explorer · {name}</title>",
        "<style>\n" + (STATIC / "style.css").read_text(encoding="utf-8") + "\n</style>", "</head>", "<body>",
        f'<header><div class="brand">cnnlab</div><div class="model-info">{name} · {len(bundle.classes)} classes · '
        f"input {c}×{h}×{w} · offline copy: pick an image below</div></header>",
        _sections(),
        _script("window.CNNLAB_OFFLINE = " + data + ";"),
        _script((STATIC / "network.js").read_text(encoding="utf-8")),
        _script((STATIC / "playground.js").read_text(encoding="utf-8")),
        "</body>", "</html>", ""])


def pick_images(bundle, count: int, files: list[str] | None = None, dataset: str | None = None,
                data_root: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """(name, uint8 (C, H, W)) pairs: the given files preprocessed as the server would, else the
    first test image of each of the first `count` classes."""
    from ..predict import Predictor

    if files:
        predictor = Predictor(bundle)
        images = []
        for name in files:
            if not Path(name).is_file():
                raise CnnlabError(f"--image {name}: no such file")
            try:
                images.append((Path(name).name, predictor.prepare(predictor.load(Path(name)))))
            except CnnlabError as exc:
                raise CnnlabError(f"--image {name}: {exc}") from None
        return images
    if count < 1:
        raise CnnlabError(f"--images must be at least 1, got {count}")
    test = bundle.load_test_data(dataset, data_root).test
    chosen: dict[int, int] = {}
    for index, label in enumerate(test.labels.tolist()):
        if label not in chosen and len(chosen) < count:
            chosen[label] = index
    return [(f"test #{index}: {bundle.classes[label]}", test.images[index]) for label, index in sorted(chosen.items())]
