"""The HTML report is self-contained: plotly.js inline once, images embedded, provenance on top."""

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import plotly.graph_objects as go

from medssl.viz.html import write_html_report


def test_html_report_embeds_plotly_once_and_images_and_needs_no_network(tmp_path):
    fig1 = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    fig2 = go.Figure(go.Bar(x=["a"], y=[1]))
    mfig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    table = pd.DataFrame({"method": ["isimed", "simclr"], "spearman": [0.97, 0.41]})
    out = write_html_report(tmp_path / "r" / "report.html", "Demo <report>",
                            [("Table", [table, "a note"]), ("Figures", [fig1, fig2, mfig])],
                            provenance="synthetic deformations of one real CT")
    text = out.read_text(encoding="utf-8")
    assert "Demo &lt;report&gt;" in text
    assert text.index("synthetic deformations of one real CT") < text.index("<h2>Table</h2>")
    assert "isimed" in text and "0.97" in text
    assert text.count('<img src="data:image/png;base64,') == 1
    # plotly.js is inlined exactly once, and nothing is loaded from elsewhere
    assert len(re.findall(r"plotly\.js v\d", text)) >= 1
    assert not re.search(r"<script[^>]+src=\"http", text)
    assert text.count('class="plotly-graph-div"') == 2
    assert not list(out.parent.glob(".*.tmp"))
