"""The report's table says what its cells hold; histogram legends stay off the bars."""

from __future__ import annotations

import random

import pytest

from apo_kernels.clair.report import (
    PLOTTED,
    contrastiveness_report,
    histogram_figure,
    print_report,
)


def reports() -> dict:
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.choice("abcdefg") for _ in range(12))

    pairs = [(text(), text()) for _ in range(60)]
    return {"clair": contrastiveness_report(pairs),
            "[judged]": contrastiveness_report(pairs[:20])}


def test_table_labels_its_bracket():
    from rich.console import Console

    console = Console(record=True, width=120)
    print_report(reports(), console)
    out = console.export_text()
    # rich took "[p10, p90]" (and a label in brackets) for markup and dropped it.
    assert out.count("mean | median [p10, p90]") == 3  # two column headers, the caption
    assert "[judged] (n=20)" in out
    assert "p10 and p90 are the 10th and 90th percentiles" in out
    assert " -0 " not in out and "[-0," not in out


@pytest.mark.parametrize("metric", PLOTTED)
def test_histogram_legend_is_outside_the_axes(metric):
    import matplotlib.pyplot as plt

    fig = histogram_figure(reports(), metric, bins=10)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        legends = fig.legends + ([ax.get_legend()] if ax.get_legend() else [])
        assert len(legends) == 1
        texts = [t.get_text() for t in legends[0].get_texts()]
        assert texts == ["clair (n=60)", "[judged] (n=20)"]
        leg = legends[0].get_window_extent(renderer)
        assert not leg.overlaps(ax.get_window_extent(renderer))
        assert not leg.overlaps(ax.title.get_window_extent(renderer))
        # Inside the figure, not cut off.
        assert fig.bbox.contains(leg.x0, leg.y0) and fig.bbox.contains(leg.x1, leg.y1)
    finally:
        plt.close(fig)
