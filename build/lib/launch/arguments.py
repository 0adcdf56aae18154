"""Command-line parsing where KEY=VALUE config overrides may stand anywhere, not only in one run after the options.

argparse fills a `nargs="*"` positional from ONE run of positionals: `train --config C lr=0.01 --run-dir R
max_epochs=3` left `max_epochs=3` unrecognized and stopped the command (seen on Python 3.12).
"""
from __future__ import annotations

import argparse


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """parse_args, with every KEY=VALUE left over appended to `args.overrides` in command-line order. Anything else
    left over (an unknown option, a word without '=', an override for a command that takes none) is an error."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not takes_overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args
