"""`python -m mpmp.report --metrics M.jsonl [--trace T.json] [--plan P.json] [--step K] --out DIR`.

Writes PNGs into DIR and lists each on stdout with a one-line caption. A bad input (a missing or
malformed file, a trace from another run than the metrics, a step the trace does not hold) and a
missing matplotlib end with one line on stderr and exit code 2.
"""

import argparse
import os
import sys

from mpmp.cli import fail
from mpmp.errors import MpmpError

INSTALL_HINT = "error: the pictures need matplotlib: pip install 'mpmp[plot]'"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mpmp.report",
        description="Draw pictures of a run from its files: the timeline of one step, the training curves, "
        "memory per rank and bytes per operation (PNGs, listed with a caption each).",
    )
    p.add_argument("--metrics", required=True, metavar="FILE", help="the run's --metrics JSONL")
    p.add_argument("--trace", metavar="FILE", help="the run's --trace JSON: adds the timeline and bytes per operation")
    p.add_argument("--plan", metavar="FILE", help="python -m mpmp.plan --json output: predictions beside the measures")
    p.add_argument(
        "--step",
        type=int,
        metavar="K",
        help="the step to draw (default: the median-duration step of the trace after warm-up)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs (created if missing)")
    return p


def _inputs(args):
    from mpmp.report import files

    if args.step is not None and not args.trace:
        raise files.ReportError("--step needs --trace (the timeline is drawn from the trace)")
    metrics = files.read_metrics(args.metrics)
    trace = files.read_trace(args.trace) if args.trace else None
    if trace is not None:
        files.check_same_run(metrics, trace)
    plan = files.read_plan(args.plan, trace.layout if trace else None) if args.plan else None
    return metrics, trace, plan


def draw_all(args) -> list:
    """[(path, caption)] of the PNGs written."""
    from mpmp.report import curves, figure, memory, steps, timeline

    metrics, trace, plan = _inputs(args)
    view = steps.step_view(trace, steps.choose_step(trace, metrics, args.step)) if trace else None
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        raise MpmpError(f"cannot create {args.out}: {exc.strerror or exc}") from None
    pictures = [("curves.png", curves.draw(metrics)), ("memory.png", memory.draw(metrics, trace, plan))]
    if view is not None:
        pictures.insert(0, ("timeline.png", timeline.draw(trace, view, plan)))
    written = []
    for name, (fig, caption) in pictures:
        path = os.path.join(args.out, name)
        figure.save(fig, path, caption)
        written.append((path, caption))
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    try:
        for path, caption in draw_all(args):
            print(f"{path}: {caption}")
    except MpmpError as exc:
        return fail(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
