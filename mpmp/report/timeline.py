"""The timeline of one step: one row per rank, compute above, communication below.

Compute spans are coloured by kind and labelled with micro-batch and chunk (F3.1 = forward of
micro-batch 3 on chunk 1) where they are wide enough; a recomputation is drawn hatched inside its
backward. Communication is coloured by group: each operation is drawn pale from issue to completion
and solid for the time the rank was blocked in it, so a non-blocking all-reduce that overlaps the
backward shows as a long pale bar with a short solid end. Operations in flight together get lanes.
"""

import math
import re

from mpmp.comm.grid import coord_of
from mpmp.report import figure
from mpmp.report.files import Plan, Trace
from mpmp.report.steps import StepView, blocked_us, measured_bubble

COMPUTE_ROW = (-0.40, 0.38)  # (offset from the rank's centre line, height) of the compute bar
COMM_ROW = (0.02, 0.38)  # the lanes of communication share this band
PALE = 0.3  # alpha of the in-flight, unblocked part of an operation
LABEL_PX_PER_CHAR = 5.5  # fontsize 7
_NAME = re.compile(r"(BW|F|B|W)(\d+)\.(\d+)$")


def compute_kind(name: str) -> str:
    """F, B, BW, W, recompute or optimizer (anything else draws as optimizer's grey)."""
    m = _NAME.match(name)
    return m.group(1) if m else name if name in figure.COMPUTE_COLORS else "optimizer"


def title(trace: Trace, view: StepView, plan: Plan | None = None) -> str:
    lay = trace.layout
    axes = [f"{k} {lay[k]}" for k in ("tp", "pp", "dp")] + ([f"cp {lay['cp']}"] if lay["cp"] > 1 else [])
    text = f"step {view.step}: {' x '.join(axes)}, {trace.schedule}, {trace.micro_batches} micro-batches"
    if trace.virtual_stages > 1:
        text += f", {trace.virtual_stages} virtual stages"
    text += f" | step {view.seconds * 1e3:.1f} ms, bubble {measured_bubble(view):.1%}"
    if plan is not None:
        text += f" (plan: {plan.step_s * 1e3:.1f} ms, bubble {plan.bubble:.1%})"
    return text


def _lanes(spans: list) -> tuple[list, int]:
    """[(span, lane)] and the lane count. A rank is blocked in one operation at a time, so the
    blocking ones share lane 0; operations in flight without blocking (isend, iall_reduce) take the
    first free lane after it, so overlapping ones show side by side."""
    blocking = [s for s in spans if blocked_us(s) >= s.dur]
    ends, placed = [math.inf] if blocking else [], [(s, 0) for s in blocking]
    for s in sorted((s for s in spans if blocked_us(s) < s.dur), key=lambda s: s.start):
        lane = next((i for i, e in enumerate(ends) if e <= s.start), len(ends))
        ends[lane : lane + 1] = [s.end]
        placed.append((s, lane))
    return placed, max(len(ends), 1)


def _draw_compute(ax, r: int, spans: list, t0: float, min_label_ms: float):
    off, height = COMPUTE_ROW
    for s in spans:
        kind = compute_kind(s.name)
        x, w = (s.start - t0) / 1e3, s.dur / 1e3
        if kind == "recompute":  # nested inside its backward: a hatched band in the middle
            ax.broken_barh(
                [(x, w)],
                (r + off + height / 4, height / 2),
                facecolors=figure.COMPUTE_COLORS[kind],
                hatch="////",
                edgecolor="white",
                linewidth=0,
            )
            continue
        ax.broken_barh(
            [(x, w)], (r + off, height), facecolors=figure.COMPUTE_COLORS[kind], edgecolor="black", linewidth=0.3
        )
        if kind != "optimizer" and w >= min_label_ms * len(s.name):
            ax.text(x + w / 2, r + off + height / 2, s.name, ha="center", va="center", fontsize=7)


def _draw_comm(ax, r: int, spans: list, t0: float):
    off, band = COMM_ROW
    placed, n = _lanes(spans)
    h = band / n
    for s, lane in placed:
        color = figure.GROUP_COLORS.get(s.cat, figure.OTHER_COLOR)
        y = (r + off + lane * h, h * 0.9)
        x, w, blocked = (s.start - t0) / 1e3, s.dur / 1e3, blocked_us(s) / 1e3
        ax.broken_barh([(x, w)], y, facecolors=color, alpha=PALE, linewidth=0)
        ax.broken_barh([(x + w - blocked, blocked)], y, facecolors=color, linewidth=0)


def _rank_labels(trace: Trace) -> list:
    tp, dp, cp = trace.layout["tp"], trace.layout["dp"], trace.layout["cp"]
    coords = [coord_of(r, tp, dp, cp) for r in range(trace.world)]
    return [
        f"rank {r}\npp {c.pp} tp {c.tp} dp {c.dp}" + (f" cp {c.cp}" if cp > 1 else "") for r, c in enumerate(coords)
    ]


def _legend_entries(view: StepView) -> list:
    kinds = {compute_kind(s.name) for spans in view.compute.values() for s in spans}
    groups = sorted({s.cat for spans in view.comm.values() for s in spans})
    entries = [(figure.COMPUTE_NAMES[k], figure.COMPUTE_COLORS[k], 1.0) for k in figure.COMPUTE_COLORS if k in kinds]
    entries += [(f"{g} blocked", figure.GROUP_COLORS.get(g, figure.OTHER_COLOR), 1.0) for g in groups]
    entries += [("in flight, not blocked", "#777777", PALE)] if groups else []
    return entries


def draw(trace: Trace, view: StepView, plan: Plan | None = None):
    """(figure, title) of the step's timeline; x in ms from the step's start."""
    fig = figure.new_figure(figure.timeline_height(view.ranks), bottom_px=130)
    ax = fig.add_subplot()
    span_ms = max(view.end - view.start, 1e-3) / 1e3
    axes_px = figure.WIDTH * (fig.subplotpars.right - fig.subplotpars.left)
    min_label_ms = LABEL_PX_PER_CHAR * span_ms / axes_px
    for r in range(view.ranks):
        _draw_compute(ax, r, view.compute[r], view.start, min_label_ms)
        _draw_comm(ax, r, view.comm[r], view.start)
    ax.set_yticks(range(view.ranks), _rank_labels(trace), fontsize=8)
    ax.set_ylim(view.ranks - 0.5, -0.5)
    ax.set_xlim(0, span_ms)
    ax.set_xlabel("ms from the step's start (per rank: compute above, communication below)")
    ax.grid(axis="x", linewidth=0.3, alpha=0.5)
    text = title(trace, view, plan)
    ax.set_title(text, fontsize=10)
    figure.legend(fig, _legend_entries(view))
    return fig, text
