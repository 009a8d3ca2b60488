"""The one text-table writer, HTML tables, numbers and the colour lookup table (`cnnlab.formatting`)."""

from __future__ import annotations

import numpy as np
import pytest

from cnnlab.formatting import colour_table, format_value, html_table, key_value_rows, text_table


def test_text_and_html_tables_align_and_escape():
    rows = [{"name": "a<b", "count": "1,234"}, {"name": "c", "count": "5"}]
    assert text_table(rows, right=["count"]).splitlines() == ["name  count", "-----------", "a<b   1,234", "c         5"]
    html = html_table(rows, right=["count"], caption="x & y")
    assert "a&lt;b" in html and "x &amp; y" in html and html.count("<tr>") == 3
    assert text_table([]) == html_table([]) == ""


def test_columns_order_the_table_and_give_a_header_without_rows():
    rows = [{"b": "2", "a": "1"}]
    assert text_table(rows, columns=["a", "b"]).splitlines()[-1] == "1  2"
    assert text_table([], columns=["trial", "state"]).splitlines() == ["trial  state", "------------"]


def test_markdown_tables_have_no_padding_and_no_stray_pipes():
    rows = [{"run": "a|b", "acc": "99%"}]
    assert text_table(rows, markdown=True).splitlines() == ["| run | acc |", "|---|---|", "| a/b | 99% |"]


def test_numbers_read_as_people_read_them():
    assert [format_value(v) for v in (28938, 0.9806, True, None, [1, 2.5])] == ["28,938", "0.9806", "True", "None", "1, 2.5"]
    assert key_value_rows({"count": 1000}) == [{"": "count", "value": "1,000"}]


def test_colour_table_is_a_read_only_256_entry_lookup():
    pytest.importorskip("matplotlib")
    table = colour_table("RdBu_r")
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(table[128]) == pytest.approx((247, 246, 246), abs=12)  # the middle of RdBu_r is near white
    assert colour_table("RdBu_r") is table and not table.flags.writeable
