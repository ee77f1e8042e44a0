"""Figure sizes, colours and saving, shared by the pictures.

Sizes are fixed in pixels, so a reader (and a test) knows what to expect: 1600 px wide; the timeline
200 px plus 100 px per rank high, the training curves 1000 px, memory and bytes 800 px.
"""

import matplotlib

matplotlib.use("Agg")  # files only, never a window

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from mpmp.pipeline.timeline import COLORS as SCHEDULE_COLORS  # noqa: E402
from mpmp.report.files import ReportError  # noqa: E402

DPI = 100
WIDTH = 1600
CURVES_HEIGHT = 1000
MEMORY_HEIGHT = 800

# Compute kinds in the colours of `python -m mpmp.schedule --png`, so the two pictures read alike.
COMPUTE_COLORS = {
    "F": SCHEDULE_COLORS["F"],
    "B": SCHEDULE_COLORS["B"],
    "BW": "#c0612b",
    "W": SCHEDULE_COLORS["W"],
    "recompute": "#9b59b6",
    "optimizer": "#8c8c8c",
}
COMPUTE_NAMES = {
    "F": "forward",
    "B": "backward B (input grads)",
    "BW": "backward (fused)",
    "W": "backward W (weight grads)",
    "recompute": "recompute",
    "optimizer": "optimizer",
}
GROUP_COLORS = {
    "tp": "#1f77b4",
    "cp": "#17becf",
    "dp": "#d62728",
    "pp": "#2ca02c",
    "embed": "#8c564b",
    "mp": "#e377c2",
    "world": "#444444",
}
OTHER_COLOR = "#bcbd22"
MEMORY_COLORS = {"params": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52"}


def timeline_height(ranks: int) -> int:
    return 200 + 100 * ranks


def new_figure(height_px: int, top_px: int = 60, bottom_px: int = 80) -> Figure:
    """A figure of WIDTH x height_px pixels with fixed margins in pixels for the title and legend."""
    fig = Figure(figsize=(WIDTH / DPI, height_px / DPI), dpi=DPI)
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - top_px / height_px, bottom=bottom_px / height_px)
    return fig


def legend(fig: Figure, entries: list, ncol: int = 8):
    """entries: [(label, colour, alpha)] as a row of patches along the bottom edge."""
    handles = [Patch(facecolor=c, alpha=a, edgecolor="black", linewidth=0.4, label=t) for t, c, a in entries]
    fig.legend(handles=handles, loc="lower center", ncol=min(ncol, len(handles)), fontsize=8, frameon=False)


def save(fig: Figure, path: str, title: str):
    """Write the PNG at the fixed size; its title also goes into the PNG's Title text chunk."""
    try:
        fig.savefig(path, dpi=DPI, metadata={"Title": title, "Software": "mpmp.report"})
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from None
