"""`python -m mpmp.schedule --pp 4 --micro-batches 8`: print a pipeline schedule's per-rank timeline.

Builds every rank's instruction list (mpmp.pipeline.schedules), simulates and checks them
(mpmp.pipeline.timeline), prints one row per rank and one column per time slot, then the bubble
fraction the simulation implies next to the papers' formula. `--png FILE` draws the same timeline.
"""

import argparse
import shutil
import sys

from mpmp.cli import fail
from mpmp.errors import ConfigError, MpmpError
from mpmp.pipeline import schedules as S
from mpmp.pipeline.timeline import parse_costs, render, save_png, slot_timeline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpmp.schedule",
        description="Print a pipeline schedule's per-rank timeline (F/B/W per time slot) and its bubble fraction.",
    )
    p.add_argument("--pp", type=int, default=4, metavar="P", help="pipeline stages, one per rank (default 4)")
    p.add_argument("--micro-batches", type=int, default=8, metavar="M", help="micro-batches per step (default 8)")
    p.add_argument("--schedule", default="1f1b", metavar="NAME", help=f"one of {', '.join(S.SCHEDULES)} (default 1f1b)")
    p.add_argument(
        "--virtual-stages",
        type=int,
        metavar="V",
        help="model chunks per rank, interleaved only (default 2 for interleaved, else 1)",
    )
    p.add_argument(
        "--costs",
        default="1,1,1",
        metavar="F,B,W",
        help="times F,B,W of one stage's forward, input-gradient backward and weight-gradient pass "
        "(default 1,1,1; a fused backward costs B+W)",
    )
    p.add_argument(
        "--width",
        type=int,
        metavar="COLS",
        help="wrap the timeline at this many characters (default: the terminal's width when printing "
        "to a terminal, else no wrapping; 0: never wrap)",
    )
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
        print(
            "legend: F3 = forward of micro-batch 3, "
            + (
                "B3 = its input-gradient backward, W3 = its deferred weight gradient"
                if split
                else "B3 = its backward, input and weight gradients fused (it lasts B+W)"
            )
            + "; '--' = the op to its left goes on; '.' = idle"
        )
        if v > 1:
            print(f"        F3a, F3b, ... = micro-batch 3 on the rank's chunk 0, 1, ... (virtual stage s, s+{pp}, ...)")
        print(f"        a chunk's F, B, W take {', '.join(str(int(c / quantum)) for c in costs)} slot(s)")
        notes = [n for n, bad in (("assumes F = B = W", len(set(costs)) > 1), ("assumes m >= pp", m < pp)) if bad]
        formula = "(p-1)/(" + {"interleaved": "v*m", "zb-h1": "3m"}.get(args.schedule, "m") + "+p-1)"
        print(
            f"bubble: {bubble:.4f} simulated, {theory:.4f} theoretical {formula}"
            + (f" ({'; '.join(notes)})" if notes and args.schedule == "zb-h1" else "")
        )
        if plt is not None:
            title = f"{args.schedule} pp={pp} m={m} v={v}: bubble {bubble:.3f} (theory {theory:.3f})"
            save_png(plt, args.png, rows, n_slots, title)
            print(f"png: {args.png}")
    except MpmpError as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
