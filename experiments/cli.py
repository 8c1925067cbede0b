"""What every command shares on its command line: bad arguments are one ``error:`` line and exit code 2.

argparse prints its usage and then ``prog: error: message``; the toolkit's rule (README, reliability) is a single
line that starts with ``error:`` and names the flag, before any work. The argument types below refuse bad
numbers the same way, at parse time.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["ArgumentParser", "image_size", "non_negative_int", "positive_int"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the toolkit's error line: ``error: <prog>: <message>``, exit 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _integer(text: str, low: int) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def image_size(text: str) -> tuple[int, int]:
    """``H`` or ``HxW``, positive integers."""
    h, _, w = text.lower().partition("x")
    try:
        return positive_int(h), positive_int(w or h)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive integers, got {text!r}") from None
