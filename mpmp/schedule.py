"""Draw a pipeline schedule as a per-rank timeline: `python -m mpmp.schedule --pp 4 --micro-batches 8`.

Builds every rank's instruction list (mpmp.pipeline.schedules), runs them through the event simulation,
which also checks them, and prints one row per rank and one column per time slot, then the bubble
fraction the simulation implies next to the papers' formula. One slot is one chunk-op at unit cost
(with v virtual stages a chunk op costs 1/v of the simulation's time; we scale by v). `--png FILE`
draws the same timeline with matplotlib.
"""

import argparse
import math
import shutil
import sys
from fractions import Fraction

from mpmp.errors import ConfigError, MpmpError
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
    timeline = S.simulate(S.build_all(schedule, pp, m, v), pp, m, v, *map(float, costs))
    # One slot is the largest time that divides every cost (1 for unit costs), over v for the chunks.
    scale = math.lcm(*(c.denominator for c in costs))
    quantum = Fraction(math.gcd(*(int(c * scale) for c in costs)), scale)
    unit = float(quantum) / v
    rows = [
        [(round(a / unit), round((b - a) / unit), f"{LETTER[type(i)]}{i.mb}" + (chr(97 + i.chunk) if v > 1 else ""))
         for a, b, i in t]
        for t in timeline
    ]  # fmt: skip
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpmp.schedule",
        description="Print a pipeline schedule's per-rank timeline (F/B/W per time slot) and its bubble fraction.",
    )
    p.add_argument("--pp", type=int, default=4, metavar="P", help="pipeline stages, one per rank (default 4)")
    p.add_argument("--micro-batches", type=int, default=8, metavar="M", help="micro-batches per step (default 8)")
    p.add_argument("--schedule", default="1f1b", metavar="NAME", help=f"one of {', '.join(S.SCHEDULES)} (default 1f1b)")
    p.add_argument("--virtual-stages", type=int, metavar="V",
                   help="model chunks per rank, interleaved only (default 2 for interleaved, else 1)")  # fmt: skip
    p.add_argument("--costs", default="1,1,1", metavar="F,B,W",
                   help="times F,B,W of one stage's forward, input-gradient backward and weight-gradient pass "
                   "(default 1,1,1; a fused backward costs B+W)")  # fmt: skip
    p.add_argument("--width", type=int, metavar="COLS",
                   help="wrap the timeline at this many characters (default: the terminal's width when printing "
                   "to a terminal, else no wrapping; 0: never wrap)")  # fmt: skip
    p.add_argument("--png", metavar="FILE", help="also draw the timeline into FILE as a PNG (needs matplotlib)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plt = None
        if args.png:
            try:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                raise ConfigError("--png needs matplotlib (pip install matplotlib)") from None
        v = args.virtual_stages if args.virtual_stages is not None else 1 + (args.schedule == "interleaved")
        pp, m, costs = args.pp, args.micro_batches, parse_costs(args.costs)
        rows, n_slots, bubble, quantum = slot_timeline(args.schedule, pp, m, v, costs)
        theory = S.theoretical_bubble(args.schedule, pp, m, v)
        width = args.width if args.width is not None else shutil.get_terminal_size().columns * sys.stdout.isatty()
        print(f"{args.schedule}: pp={pp}, micro-batches={m}" + (f", virtual stages={v}" if v > 1 else ""))
        print("\n".join(render(rows, n_slots, width)))
        split = args.schedule == "zb-h1"
        print("legend: F3 = forward of micro-batch 3, "
              + ("B3 = its input-gradient backward, W3 = its deferred weight gradient" if split
                 else "B3 = its backward, input and weight gradients fused (it lasts B+W)")
              + "; '--' = the op to its left goes on; '.' = idle")  # fmt: skip
        if v > 1:
            print(f"        F3a, F3b, ... = micro-batch 3 on the rank's chunk 0, 1, ... (virtual stage s, s+{pp}, ...)")
        print(f"        a chunk's F, B, W take {', '.join(str(int(c / quantum)) for c in costs)} slot(s)")
        notes = [n for n, bad in (("assumes F = B = W", len(set(costs)) > 1), ("assumes m >= pp", m < pp)) if bad]
        formula = "(p-1)/(" + {"interleaved": "v*m", "zb-h1": "3m"}.get(args.schedule, "m") + "+p-1)"
        print(f"bubble: {bubble:.4f} simulated, {theory:.4f} theoretical {formula}"
              + (f" ({'; '.join(notes)})" if notes and args.schedule == "zb-h1" else ""))  # fmt: skip
        if plt is not None:
            title = f"{args.schedule} pp={pp} m={m} v={v}: bubble {bubble:.3f} (theory {theory:.3f})"
            save_png(plt, args.png, rows, n_slots, title)
            print(f"png: {args.png}")
    except MpmpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
