"""Training curves: loss, gradient norm, learning rate, tokens/s and skipped steps against step.

Each resumption (a new run_id in the metrics) is a dashed line before the first step it wrote; a step
written twice (after a crash) shows its later value. Null values (non-finite numbers) leave gaps.
"""

import math

from mpmp.report import figure
from mpmp.report.files import Metrics, series

PANELS = (
    ("loss", "loss"),
    ("grad_norm", "gradient norm\n(before clipping)"),
    ("lr", "learning rate"),
    ("tokens_per_s", "tokens/s"),
    ("skipped", "skipped\n(overflow)"),
)


def title(metrics: Metrics) -> str:
    steps, loss = series(metrics, "loss")
    finite = [(k, v) for k, v in zip(steps, loss) if math.isfinite(v)]
    text = f"training curves: steps {steps[0]}..{steps[-1]}"
    if finite:
        text += f", loss {finite[0][1]:.4f} -> {finite[-1][1]:.4f}"
    skipped = sum(1 for v in series(metrics, "skipped")[1] if v == v and v > 0)
    n = len(metrics.resumptions)
    return text + f", {skipped} skipped, {n} resumption{'s' * (n != 1)}"


def _resumptions(axes, metrics: Metrics):
    for i, (step, run_id) in enumerate(metrics.resumptions):
        for ax in axes:
            ax.axvline(step - 0.5, color="black", linestyle="--", linewidth=0.8)
        axes[0].annotate(
            f"resumed\n({run_id})",
            (step - 0.5, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3 - 18 * (i % 2)),
            textcoords="offset points",
            fontsize=7,
            va="top",
        )


def draw(metrics: Metrics):
    """(figure, title)."""
    fig = figure.new_figure(figure.CURVES_HEIGHT, bottom_px=60)
    axes = fig.subplots(len(PANELS), 1, sharex=True)
    marker = "." if len(metrics.rows) <= 60 else None
    for ax, (key, label) in zip(axes, PANELS):
        steps, values = series(metrics, key)
        if key == "skipped":
            ax.bar(steps, [1 if v == v and v > 0 else 0 for v in values], width=0.8, color="#c44e52")
            ax.set_ylim(0, 1.2)
            ax.set_yticks([0, 1], ["no", "yes"])
        else:
            ax.plot(steps, values, marker=marker, linewidth=1, markersize=3)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(linewidth=0.3, alpha=0.5)
    _resumptions(axes, metrics)
    axes[-1].set_xlabel("step")
    text = title(metrics)
    axes[0].set_title(text, fontsize=10)
    return fig, text
