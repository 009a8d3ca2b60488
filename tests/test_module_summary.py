"""`cnnlab.summary(module, input_shape)`: any nn.Module, tabulated by forward hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.module_summary import summarize_module


class SharedBlock(nn.Module):
    """One conv used twice, a parameter outside any leaf, a tuple output, padding='same'."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding="same", dilation=2, bias=False)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.norm = nn.BatchNorm2d(8)
        self.gain = nn.Parameter(torch.ones(1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        x = self.shared(self.shared(self.stem(x)))
        x = self.norm(self.pool(x)) * self.gain
        return self.head(x), x


def test_rows_follow_the_calls_with_shapes_params_and_macs():
    module = SharedBlock()
    module.train()
    summary = summarize_module(module, (3, 15, 15))
    assert module.training  # put back as it was
    names = [row.name for row in summary.rows]
    assert names == ["stem", "shared", "shared", "pool", "norm", "head.0", "head.1", "head.2"]
    shapes = [row.out_shape for row in summary.rows]
    assert shapes == [(8, 15, 15), (8, 15, 15), (8, 15, 15), (8, 8, 8), (8, 8, 8), (8, 1, 1), (8,), (5,)]
    params = {row.name: row.params for row in summary.rows if row.params}
    assert params == {"stem": 8 * 3 * 9, "shared": 8 * 4 * 9 + 8, "norm": 16, "head.2": 45}  # shared counted once
    assert summary.total_params == sum(p.numel() for p in module.parameters()) == sum(params.values()) + 1
    assert "1 parameters belong to modules that are not leaves" in str(summary)
    macs = [row.macs for row in summary.rows]
    assert macs[:3] == [8 * 15 * 15 * 3 * 9, 8 * 15 * 15 * 4 * 9, 8 * 15 * 15 * 4 * 9] and macs[-1] == 40
    assert summary.total_macs == sum(macs) and summary.output_shape == (5,)


def test_conv_and_pool_rows_show_the_formula_checked_against_pytorch():
    summary = summarize_module(SharedBlock(), (3, 15, 15))
    formulas = {row.name: row.formula for row in summary.rows}
    assert formulas["stem"] == "'same' keeps 15"
    assert formulas["shared"] == "⌊(15 + 2·1 − 3)/1⌋ + 1 = 15"
    assert formulas["pool"] == "⌈(15 + 2·1 − 3)/2⌉ + 1 = 8"
    assert formulas["norm"] == formulas["head.2"] == ""
    rectangular = summarize_module(nn.Sequential(nn.Conv2d(1, 2, (3, 5), stride=(2, 1), padding=(1, 2)),
                                                 nn.AvgPool2d(2)), (1, 9, 20))
    assert rectangular.rows[0].formula == "⌊(9 + 2·1 − 3)/2⌋ + 1 = 5 | ⌊(20 + 2·2 − 5)/1⌋ + 1 = 20"
    assert rectangular.rows[1].out_shape == (2, 2, 10)


def test_a_module_that_does_not_fit_the_input_names_its_layer():
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    assert summarize_module(module, (1, 28, 28)).total_params == 4 * 9 + 4 + 4 * 26 * 26 * 10 + 10
    with pytest.raises(CnnlabError, match=r"^layer 2 \(Linear\(in_features=2704.*fails on an input of 1x30x30: mat1"):
        summarize_module(module, (1, 30, 30))
    with pytest.raises(CnnlabError, match="input_shape: expected positive sizes"):
        summarize_module(module, (1, 0, 28))


def test_text_and_html_tables():
    summary = summarize_module(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), (1, 5, 5), name="tiny")
    text = str(summary)
    assert text.startswith("tiny: input 1x5x5") and "⌊(5 + 2·0 − 3)/1⌋ + 1 = 3" in text and "2x3x3" in text
    html = summary._repr_html_()
    assert html.count("<tr>") == 4 and "<b>tiny: input 1x5x5</b>" in html
    assert "&lt;" in summarize_module(nn.Identity(), (3,), name="<x>")._repr_html_()  # escaped
