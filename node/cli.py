"""``dume-node``: what runs on a member's host. ``train`` fine-tunes the member's expert from the shared base."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from dume.shared.cli import positive_float, positive_int, run_cli
from dume.shared.training import TrainSettings, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dume-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    training = commands.add_parser("train", help="fine-tune a domain expert from the shared base model")
    training.add_argument("--base", type=Path, required=True, help="the shared base model directory")
    training.add_argument("--data", type=Path, required=True, help="the domain data (.jsonl, .txt or a directory)")
    training.add_argument("--out", type=Path, required=True, help="where to write the expert (must not exist)")
    defaults = TrainSettings()
    training.add_argument("--steps", type=positive_int, default=defaults.steps, help="optimizer steps")
    training.add_argument("--learning-rate", type=positive_float, default=defaults.learning_rate)
    training.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    training.add_argument("--sequence-length", type=positive_int, default=defaults.sequence_length)
    training.add_argument("--seed", type=int, default=defaults.seed)
    training.set_defaults(run=run_train)
    return parser


def run_train(args: argparse.Namespace) -> None:
    settings = TrainSettings(args.steps, args.learning_rate, args.batch_size, args.sequence_length, args.seed)
    print(f"wrote {train(args.base, args.data, args.out, settings)}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
