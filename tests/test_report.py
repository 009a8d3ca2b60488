"""`cnnlab report`: one self-contained HTML file holding every section."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest

from cnnlab.cli import main
from cnnlab.report import SECTIONS, write_report

from tests.support.tiny_runs import CLASSES, make_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report_html(tiny_run) -> str:
    """The report as `cnnlab report RUN` writes it: to RUN/report.html unless --out says otherwise."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["report", str(tiny_run), "--index", "1"]) == 0
    assert f"wrote {tiny_run / 'report.html'}" in printed.getvalue()
    return (tiny_run / "report.html").read_text(encoding="utf-8")


def test_every_section_is_there(report_html):
    for key, title in SECTIONS:
        assert f'<section id="{key}"><h2>{title}</h2>' in report_html
        assert f'href="#{key}"' in report_html
    section_bodies = re.split(r'<section id="', report_html)[1:]
    assert len(section_bodies) == len(SECTIONS)
    for body in section_bodies:
        assert "not available" not in body, body[:200]


def test_contents(report_html):
    assert "⌊(12 + 2·1 − 3)/1⌋ + 1 = 12" in report_html  # the summary table's formulas
    assert "feature-map size: 12 → 12 → 6 → 6 → 3" in report_html
    for name in CLASSES:  # per-class metrics
        assert f"<td>{name}</td>" in report_html
    assert "precision" in report_html and "recall" in report_html
    assert "softmax" in report_html
    assert "batch_size" in report_html  # the training configuration


def test_self_contained(report_html):
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', report_html)
    # curves, confusion, mistakes, filters of both conv layers, feature maps
    assert {alt for alt, _ in images} >= {"training curves", "confusion matrix", "most confident mistakes",
                                          "Grad-CAM of the most confident mistakes",
                                          "filters of layer 1", "filters of layer 4", "feature maps"}
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", report_html)  # nothing loaded from the network
    assert "<script" not in report_html and "@import" not in report_html


def test_cli_mistakes_are_one_line_errors(tiny_run, tmp_path, capsys):
    assert main(["report", str(tiny_run), "--out", str(tmp_path / "story.pdf")]) == 2
    assert "use a .html file name" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow  # a second whole report (seconds); the first stays in the fast tier
def test_report_without_the_dataset_still_tells_the_rest(tiny_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    html = write_report(copy, dataset=f"folder:{tmp_path / 'gone'}").read_text(encoding="utf-8")
    assert html.count("not available") >= 3  # metrics, confusion, mistakes, feature maps
    assert 'alt="training curves"' in html and 'alt="filters of layer 1"' in html
