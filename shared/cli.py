"""``dume``: local tools. ``dume merge`` runs the whole method on one machine for users who hold all experts."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dume.shared.demo import format_table, run_demo
from dume.shared.errors import DumeError
from dume.shared.merge import ExpertSpec, MergeSettings, merge
from dume.shared.ridge import DEFAULT_RHO


def parse_expert(value: str) -> ExpertSpec:
    name, equals, rest = value.partition("=")
    model_dir, colon, data_path = rest.partition(":")
    if not (equals and colon and name and model_dir and data_path):
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=MODEL_DIR:DATA_PATH")
    return ExpertSpec(name, Path(model_dir), Path(data_path))


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


def merge_settings(args: argparse.Namespace) -> MergeSettings:
    return MergeSettings(top_k=args.top_k, rho=args.rho, router_bias=args.router_bias,
                         normalize=not args.no_normalize, temperature=args.temperature,
                         sequence_length=args.sequence_length, batch_size=args.batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dume", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge dense experts into one MoE checkpoint, on this machine")
    merge.add_argument("--expert", action="append", type=parse_expert, required=True, metavar="NAME=MODEL_DIR:DATA",
                       help="a member: its name, its model directory and its data (.jsonl, .txt or a directory)")
    merge.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    add_merge_settings(merge)
    merge.set_defaults(run=run_merge)
    demo = commands.add_parser("demo", help="train three tiny experts, federate them on loopback (coordinator and "
                               "three nodes), revoke one, and compare perplexities")
    demo.add_argument("--workdir", type=Path, default=Path("dume-demo"), help="where to build (default ./dume-demo)")
    demo.add_argument("--base-steps", type=positive_int, default=300, help="pretraining steps of the base")
    demo.add_argument("--expert-steps", type=positive_int, default=150, help="fine-tuning steps of each expert")
    demo.set_defaults(run=run_demo_command)
    return parser


def run_merge(args: argparse.Namespace) -> None:
    out = merge(args.expert, args.out, merge_settings(args))
    print(f"wrote {out}")


def run_demo_command(args: argparse.Namespace) -> None:
    table = run_demo(args.workdir, args.base_steps, args.expert_steps)
    results = json.loads((args.workdir / "results.json").read_text())
    print(format_table(table))
    for key, what in (("all", "with all three members"), ("after_revoke", "after the revocation")):
        identical = "yes" if results["byte_identical"][key] else "NO"
        print(f"federated version {what} byte-identical to a local `dume merge`: {identical}")
    print(f"results: {args.workdir / 'results.json'} (models, data and logs are in {args.workdir})")


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse and run; a DumeError becomes one line on stderr and exit code 2, never a traceback."""
    args = parser.parse_args(argv)
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


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
