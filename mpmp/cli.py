"""What mpmp's commands share on their command lines: argparse number types that refuse, in one
line, anything that is not a finite number in range (nan, inf, negative counts), and the error line of
a command that runs as one process."""

import argparse
import math
import sys


def number(kind, allow_zero: bool = False):
    """An argparse type: a finite number of `kind` that is positive (or, with allow_zero, not negative)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'non-negative' if allow_zero else 'positive'}, not {text}")
        return value

    return parse


def fail(exc) -> int:
    """Print a one-process command's error line, `error: …`, for an MpmpError; returns its exit code."""
    print(f"error: {exc}", file=sys.stderr)
    return exc.exit_code
