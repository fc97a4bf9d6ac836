"""Command-line helpers shared by ``main.py``, the methods' flags and the tools: argparse types
that refuse what would fail later inside PyTorch (NaN, inf, out-of-range integers), and a parser
whose errors are one line.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

SEED_MAX = 2**32 - 1  # numpy's legacy seeding takes 32 bits; torch and random take more
# Float flags multiply float32 tensors: 2 * reg_lambda, say, must stay far inside float32's range (3.4e38).
FLOAT_MAX = 1e30


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), for every command of the project:
    ``<prefix> <message> (<hint>)``; the prefix defaults to "<prog>: error:"."""

    def __init__(self, *args, error_prefix: str | None = None, hint: str = "see --help", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.error_prefix, self.hint = error_prefix, hint

    def error(self, message: str):
        prefix = f"{self.prog}: error:" if self.error_prefix is None else self.error_prefix
        self.exit(2, f"{prefix} {message} ({self.hint})\n")


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if kind is float and abs(value) > FLOAT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {FLOAT_MAX:g} in size (float32 weights), got {text}")
    return value


def at_least(minimum: float, kind: type = float) -> Callable[[str], float | int]:
    """A finite number >= ``minimum``."""

    def check(text: str):
        value = _number(text, kind)
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return check


def int_between(low: int, high: int) -> Callable[[str], int]:
    """An integer in [low, high]."""

    def check(text: str) -> int:
        value = _number(text, int)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return check


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1) (momentum)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


seed = int_between(0, SEED_MAX)
