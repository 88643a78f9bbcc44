"""Argument handling shared by the command-line tools, benchmarks and examples: a bad
argument becomes one line on stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every option's default."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a one-line error and --help showing the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _number(kind, low: float, strict: bool, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what  # argparse names the type in its message
    return parse


positive_int = _number(int, 0, True, "a positive integer")
nonnegative_int = _number(int, 0, False, "a non-negative integer")
positive_float = _number(float, 0.0, True, "a positive number")
nonnegative_float = _number(float, 0.0, False, "a non-negative number")


def positive_ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers: "1,8,512"."""
    return tuple(positive_int(v.strip()) for v in text.split(",") if v.strip()) or \
        positive_int(text)


def names(choices) -> callable:
    """A comma-separated list of names, each from `choices`."""
    def parse(text: str) -> tuple[str, ...]:
        picked = tuple(v.strip() for v in text.split(",") if v.strip())
        unknown = [v for v in picked if v not in choices]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(
                f"{', '.join(unknown) or repr(text)}: choose from {', '.join(choices)}")
        return picked
    parse.__name__ = "list of names"
    return parse
