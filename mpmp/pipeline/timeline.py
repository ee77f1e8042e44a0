"""A pipeline schedule as a per-rank timeline: simulated slots, rendered as text or drawn with matplotlib.

`slot_timeline` runs every rank's instruction list (pipeline/schedules.py) through the event simulation,
which also checks them, and lays the computations out in time slots: one slot is one chunk-op at unit
cost (with v virtual stages a chunk op costs 1/v of the simulation's time; we scale by v). `render`
prints one row per rank; `draw_timeline` draws the same rows on a matplotlib axes (used by
`python -m mpmp.schedule --png` and by `python -m mpmp.bench pipeline --png`).
"""

import math
from fractions import Fraction

from mpmp.errors import ConfigError
from mpmp.pipeline import schedules as S

LETTER = {S.Forward: "F", S.Backward: "B", S.BackwardInput: "B", S.BackwardWeight: "W"}


def parse_costs(text: str) -> list[Fraction]:
    try:
        costs = [Fraction(x) for x in text.split(",")]
    except (ValueError, ZeroDivisionError):
        costs = []
    if len(costs) != 3 or min(costs) <= 0:
        raise ConfigError(f"--costs takes three positive numbers F,B,W (e.g. 1,2,1), not {text!r}")
    return costs


def slot_timeline(schedule: str, pp: int, m: int, v: int, costs: list[Fraction]):
    """Simulate; return per-rank lists of (first slot, slots, label), the slot count, the bubble and the
    time one slot stands for at v = 1."""
    S.validate(schedule, pp, m, v)  # before build_all, which returns no ranks at all for pp < 1
    t_f, t_b, t_w = map(float, costs)
    timeline = S.simulate(S.build_all(schedule, pp, m, v), pp, m, v, t_f=t_f, t_b=t_b, t_w=t_w)
    # One slot is the largest time that divides every cost (1 for unit costs), over v for the chunks.
    scale = math.lcm(*(c.denominator for c in costs))
    quantum = Fraction(math.gcd(*(int(c * scale) for c in costs)), scale)
    unit = float(quantum) / v
    rows = [
        [
            (round(a / unit), round((b - a) / unit), f"{LETTER[type(i)]}{i.mb}" + (chr(97 + i.chunk) if v > 1 else ""))
            for a, b, i in t
        ]
        for t in timeline
    ]
    n_slots = max(start + span for row in rows for start, span, _ in row)
    return rows, n_slots, S.bubble_fraction(timeline), quantum


def render(rows, n_slots: int, width: int) -> list[str]:
    """Text rows, wrapped into blocks of at most `width` characters (0: one block)."""
    w = max(len(label) for row in rows for *_, label in row) + 1
    grid = [["."] * n_slots for _ in rows]
    for r, row in enumerate(rows):
        for start, span, label in row:
            grid[r][start : start + span] = [label] + ["-" * (w - 1)] * (span - 1)
    per_block = max(1, (width - 8) // w) if width else n_slots
    lines = []
    for b0 in range(0, n_slots, per_block):
        slots = range(b0, min(n_slots, b0 + per_block))
        lines.append(("slot    " + "".join(f"{t:<{w}}" if t % 5 == 0 else " " * w for t in slots)).rstrip())
        lines += [f"rank {r:<3}" + "".join(f"{grid[r][t]:<{w}}" for t in slots).rstrip() for r in range(len(rows))]
        lines.append("")
    return lines[:-1]


COLORS = {"F": "#4c8bd6", "B": "#e8954a", "W": "#5bb56a"}


def draw_timeline(ax, rows, xmax: float, title: str, xlabel: str = "time slot"):
    """Draw per-rank rows of (start, span, label) bars on a matplotlib axes, coloured by the label's
    first letter (F, B, W); shared by this module's --png and `mpmp.bench pipeline --png`."""
    for r, row in enumerate(rows):
        for start, span, label in row:
            ax.barh(r, span, left=start, height=0.8, color=COLORS[label[0]], edgecolor="black", linewidth=0.5)
            ax.text(start + span / 2, r, label, ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"rank {r}" for r in range(len(rows))])
    ax.invert_yaxis()
    ax.set_xlim(0, xmax)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)


def save_figure(plt, fig, path: str):
    try:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def save_png(plt, path: str, rows, n_slots: int, title: str):
    fig, ax = plt.subplots(figsize=(min(40, 2 + 0.3 * n_slots), 1 + 0.45 * len(rows)))
    draw_timeline(ax, rows, n_slots, title)
    save_figure(plt, fig, path)
