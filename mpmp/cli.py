"""What mpmp's commands share on their command lines: argparse number types that refuse, in one
line, anything that is not a finite number in range (nan, inf, negative counts), the error line of a
command that runs as one process, and the checks of output paths made before any work."""

import argparse
import math
import os
import sys

from mpmp.errors import ConfigError


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


def check_writable_folder(folder, flag, create=False):
    """Fail before the work, not after it, when an output folder cannot be written."""
    if create:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{flag} {folder}: cannot create the folder ({exc.strerror or exc})") from None
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ConfigError(f"{flag}: {folder} {what}")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{flag}: folder {folder} is not writable")


def check_output_file(path, flag):
    """Fail before the work, not after it, when an output file cannot be written."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), flag)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is not writable")
