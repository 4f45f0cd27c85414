"""What the three command lines (``dume``, ``dume-node``, ``dume-coordinator``) share: argument types, the merge
settings' flags, and the rule that a user's error is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from dume.shared.config import parse_with_configuration
from dume.shared.errors import DumeError
from dume.shared.method.placement import DTYPES, Placement
from dume.shared.method.ridge import DEFAULT_RHO
from dume.shared.method.routers import MergeSettings


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive finite number")
    return number


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def add_merge_settings(parser: argparse.ArgumentParser) -> None:
    """The flags that fix a merge's output besides its members (shared by `dume merge` and the coordinator)."""
    parser.add_argument("--top-k", type=positive_int, default=1, help="experts per token (default 1)")
    parser.add_argument("--rho", type=positive_float, default=DEFAULT_RHO,
                        help=f"ridge strength relative to trace(G)/dim (default {DEFAULT_RHO})")
    parser.add_argument("--router-bias", action="store_true",
                        help="fit a router intercept (checkpoint then needs `import dume` to load)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="router temperature (default 1)")
    parser.add_argument("--no-normalize", action="store_true", help="keep raw ridge columns (no L2 normalisation)")
    parser.add_argument("--sequence-length", type=positive_int, default=256, help="tokens per packed row")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass")


def add_placement(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where a command runs the model (``dume merge``, ``dume-node join``)."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto (default: the GPU if torch sees one, else the CPU)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="precision of the model's forward (default: the model's own, typically bfloat16)")


def placement(args: argparse.Namespace) -> Placement:
    chosen = Placement(args.device, args.dtype)
    chosen.torch_device()  # refuse a device this machine cannot use before any heavy work
    return chosen


def merge_settings(args: argparse.Namespace) -> MergeSettings:
    return MergeSettings(top_k=args.top_k, rho=args.rho, router_bias=args.router_bias,
                         normalize=not args.no_normalize, temperature=args.temperature,
                         sequence_length=args.sequence_length, batch_size=args.batch_size)


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse and run; a DumeError becomes one line on stderr and exit code 2, never a traceback."""
    args = parse_with_configuration(parser, argv)  # the config file and DUME_* variables are the flags' defaults
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        code = run(args)
    except DumeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return code or 0
