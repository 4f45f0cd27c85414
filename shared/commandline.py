"""What the three command lines (``dume``, ``dume-node``, ``dume-coordinator``) share: argument types, the merge
settings' flags, and the rule that a user's error is one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from dume.shared.config import parse_with_configuration
from dume.shared.errors import INTERRUPTED, DumeError
from dume.shared.method.settings import (
    DEFAULT_EXPERT_WEIGHTING,
    DEFAULT_RHO,
    DTYPE_NAMES,
    EXPERT_WEIGHTINGS,
    MergeSettings,
)
from dume.shared.progress import no_bars_unless_terminal
from dume.shared.transport.protocol import PROTOCOL_VERSION

if TYPE_CHECKING:
    from dume.shared.method.placement import Placement


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


DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> float:
    """Seconds from "90s", "30m", "12h", "7d" or a plain number of seconds."""
    match = DURATION.match(value.strip())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 90s, 30m, 12h or 7d")
    return float(match.group(1)) * UNIT_SECONDS[match.group(2)]


def add_merge_settings(parser: argparse.ArgumentParser) -> None:
    """The flags that fix a merge's output besides its members (shared by `dume merge` and the coordinator)."""
    parser.add_argument("--top-k", type=positive_int, default=1, help="experts per token (default 1)")
    parser.add_argument("--rho", type=positive_float, default=DEFAULT_RHO,
                        help=f"ridge strength relative to trace(G)/dim (default {DEFAULT_RHO})")
    parser.add_argument("--router-bias", action="store_true",
                        help="fit a router intercept (the checkpoint then loads with dume.load_merged)")
    parser.add_argument("--temperature", type=positive_float, default=1.0, help="router temperature (default 1)")
    parser.add_argument("--no-normalize", action="store_true", help="keep raw ridge columns (no L2 normalisation)")
    parser.add_argument("--sequence-length", type=positive_int, default=256, help="tokens per packed row")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass")
    parser.add_argument("--expert-weighting", choices=EXPERT_WEIGHTINGS, default=DEFAULT_EXPERT_WEIGHTING,
                        help="each expert's weight in the router solve: 'equal' (the default: every expert scaled "
                             "to one token budget, so no member buys a larger share of routing by declaring more "
                             "or repeated data) or 'tokens' (its data as collected, the method as published)")


def add_placement(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where a command runs the model (``dume merge``, ``dume-node join``)."""
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto (default: the GPU if torch sees one, else the CPU)")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPE_NAMES),
                        help="precision of the model's forward (default: the model's own, typically bfloat16)")


def add_nproc(parser: argparse.ArgumentParser) -> None:
    """``--nproc``: statistics collected by that many worker processes (``dume merge``, ``dume-node``)."""
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="collect statistics in this many worker processes, each on its share of the batches "
                             "(one GPU each with --device cuda/auto on a GPU host; else the CPU cores split among "
                             "them); statistics from another --nproc differ in float64 rounding (default 1)")


def placement(args: argparse.Namespace) -> Placement:
    from dume.shared.method.placement import Placement  # imports torch: only once a command runs

    chosen = Placement(args.device, args.dtype)
    chosen.torch_device()  # refuse a device this machine cannot use before any heavy work
    return chosen


def merge_settings(args: argparse.Namespace) -> MergeSettings:
    return MergeSettings(top_k=args.top_k, rho=args.rho, router_bias=args.router_bias,
                         normalize=not args.no_normalize, temperature=args.temperature,
                         sequence_length=args.sequence_length, batch_size=args.batch_size,
                         expert_weighting=args.expert_weighting)


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``, for a command whose output a script reads; its run function prints with ``report``."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of prose")


def report(args: argparse.Namespace, result: dict[str, Any], prose: str) -> None:
    """Prints ``result`` as one JSON object under ``--json``, else the prose line(s) for a person."""
    print(json.dumps(result, sort_keys=True) if getattr(args, "json", False) else prose)


def installed_version() -> str:
    """The installed distribution's version (pyproject.toml is its one source)."""
    try:
        return version("dume")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse and run; a DumeError becomes one line on stderr and its exit code (README, "Exit codes"), never a
    traceback. Every command answers ``--version``, with the protocol version it speaks (``transport.protocol``)."""
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {installed_version()} (protocol {PROTOCOL_VERSION})")
    args = parse_with_configuration(parser, argv)  # the config file and DUME_* variables are the flags' defaults
    no_bars_unless_terminal()
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        code = run(args)
    except DumeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return code or 0
