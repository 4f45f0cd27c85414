"""``dume``: local tools. ``dume merge`` runs the whole method on one machine for users who hold all experts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from dume.shared.commandline import (
    add_json,
    add_merge_settings,
    add_nproc,
    add_placement,
    merge_settings,
    placement,
    positive_int,
    report,
    run_cli,
)
from dume.shared.errors import DumeError
from dume.shared.method.settings import ExpertSpec, parse_dataset


def parse_expert(value: str) -> ExpertSpec:
    """``NAME=MODEL_DIR:DATA[,DATA...]``, each DATA ``[[NODE/]DATASET=]PATH`` (see ``parse_dataset``)."""
    name, equals, rest = value.partition("=")
    model_dir, colon, data = rest.partition(":")
    items = data.split(",") if data else []
    if not (equals and colon and name and model_dir and items and all(items)):
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=MODEL_DIR:DATA[,DATA...]")
    return ExpertSpec(name, Path(model_dir), datasets=tuple(parse_dataset(item) for item in items))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dume", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge dense experts into one MoE checkpoint, on this machine")
    merge.add_argument("--expert", action="append", type=parse_expert, required=True,
                       metavar="NAME=MODEL_DIR:DATA[,DATA...]",
                       help="an expert: its name, its model directory and its datasets (.jsonl, .txt or a directory), "
                            "each [[NODE/]DATASET=]PATH: named (default: 'default') and, for a dataset another node "
                            "feeds this expert with, that node's name (default: the expert's)")
    merge.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    add_merge_settings(merge)
    add_placement(merge)
    add_nproc(merge)
    merge.add_argument("--max-tokens", type=positive_int,
                       help="statistics from at most this many tokens of each expert's data (default: all of it)")
    add_json(merge)
    merge.set_defaults(run=run_merge)
    demo = commands.add_parser("demo", help="train three tiny experts, federate them on loopback (coordinator and "
                               "three nodes), revoke one, and compare perplexities")
    demo.add_argument("--workdir", type=Path, default=Path("dume-demo"), help="where to build (default ./dume-demo)")
    demo.add_argument("--base-steps", type=positive_int, default=300, help="pretraining steps of the base")
    demo.add_argument("--expert-steps", type=positive_int, default=150, help="fine-tuning steps of each expert")
    demo.set_defaults(run=run_demo_command)
    return parser


# The run functions import torch and the method on first use, so that `--help` and bad arguments answer at once.
def run_merge(args: argparse.Namespace) -> None:
    if len(args.expert) < 2:
        raise DumeError("a merge needs at least two experts (a one-expert MoE is the expert itself): pass --expert "
                        "NAME=MODEL_DIR:DATA[,DATA...] once per expert")
    from dume.shared.method.distributed_statistics import writes_output
    from dume.shared.method.merge import merge

    out = merge(args.expert, args.out, merge_settings(args), placement(args), args.max_tokens, args.nproc)
    if writes_output():  # under torchrun only rank 0 writes, and says so
        report(args, {"out": str(out), "members": sorted(spec.name for spec in args.expert)}, f"wrote {out}")


def run_demo_command(args: argparse.Namespace) -> None:
    from dume.shared.lab.demo import format_table, run_demo

    table = run_demo(args.workdir, args.base_steps, args.expert_steps)
    results = json.loads((args.workdir / "results.json").read_text())
    print(format_table(table))
    for key, what in (("all", "with all three members"), ("after_revoke", "after the revocation"),
                      ("second_node", "with a second node feeding the math expert")):
        identical = "yes" if results["byte_identical"][key] else "NO"
        print(f"federated version {what} byte-identical to a local `dume merge`: {identical}")
    print(f"results: {args.workdir / 'results.json'} (models, data and logs are in {args.workdir})")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
