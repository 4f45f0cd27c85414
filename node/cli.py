"""``dume-node``: what runs on a member's host.

``join`` enrols with a join token and contributes the member's expert, then keeps its statistics current;
``fetch`` downloads a published version; ``leave`` takes the member out; ``train`` fine-tunes the expert.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dume.node.lifecycle import StopRequested, stop_on_signals
from dume.node.status import describe_status, node_status
from dume.node.workdir import Workdir, disk_full_is_one_line
from dume.shared.commandline import (
    add_json,
    add_placement,
    duration,
    placement,
    positive_float,
    positive_int,
    report,
    run_cli,
)
from dume.shared.config import add_config_command, join_token
from dume.shared.errors import DumeError
from dume.shared.logs import add_log_format, configure_logging
from dume.shared.method.settings import TRAINABLE, TrainSettings
from dume.shared.transport.channels import DEFAULT_CHUNK_BYTES
from dume.shared.transport.stall import STALL_SECONDS
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2_grpc as rpc

if TYPE_CHECKING:
    from dume.shared.method.placement import Placement


# The run functions import torch and the agent on first use, so that `--help` and bad arguments answer at once.
def run_join(args: argparse.Namespace) -> None:
    """SIGTERM or SIGINT at any point ends the join cleanly with exit 0."""
    from dume.node.agent import say

    configure_logging(args.log_format, "%(message)s")
    try:
        with stop_on_signals():
            _join(args)
    except StopRequested as stop:  # the step in progress is abandoned cleanly: uploads resume, files are atomic
        say(f"stopped on {stop.signal_name}; run `dume-node join` again (no token needed) to carry on")


def _join(args: argparse.Namespace) -> None:
    from dume.shared.method.data import check_documents
    from dume.shared.method.expert import ExpertDirectory

    workdir = Workdir(args.workdir)
    for path, what in ((args.model, "--model"), (args.data, "--data")):
        if not path.exists():
            raise DumeError(f"{what} {path} does not exist: give the expert's model directory and its data")
    # Everything that can be wrong here is refused before enrolling or sending a byte.
    ExpertDirectory(args.model)
    check_documents(args.data)
    chosen = placement(args)
    with disk_full_is_one_line(args.workdir):
        _contribute(args, workdir, chosen)


def _contribute(args: argparse.Namespace, workdir: Workdir, chosen: Placement) -> None:
    from dume.node.agent import Agent, enrol, say

    if args.token or args.token_file:
        token = JoinToken.decode(join_token(args.token, args.token_file))
        if workdir.enrolled() and workdir.state().get("name") not in (token.node, None):
            raise DumeError(f"{args.workdir} belongs to node {workdir.state()['name']!r}, the token is for "
                            f"{token.node!r}: use another --workdir")
        enrol(token, workdir, args.model, args.data)
    elif not workdir.enrolled():
        raise DumeError(f"{args.workdir} holds no enrolled node: pass --token (from `dume-coordinator token`)")
    else:
        check_same_inputs(workdir, args.model, args.data)
    agent = Agent(workdir, args.chunk_kib * 1024, args.max_rate_kib * 1024 if args.max_rate_kib else 0.0,
                  chosen, args.max_tokens, args.deadline if args.once else None, args.stall_timeout)
    agent.run(once=args.once)
    if args.once:
        say("contribution complete; statistics are current")


def check_same_inputs(workdir: Workdir, model: Path, data: Path) -> None:
    """A node resumes with the model and data it enrolled with: another one would change its contribution without
    anyone noticing, so it is refused (leave, then join again with a new token, to contribute another)."""
    state = workdir.state()
    for key, path, flag in (("model", model, "--model"), ("data", data, "--data")):
        if str(path.resolve()) != state[key]:
            raise DumeError(f"{workdir.root} joined with {flag} {state[key]}, not {path.resolve()}: rejoin with the "
                            f"same {flag}, or `dume-node leave` and join again with a new token to contribute another")


def run_fetch(args: argparse.Namespace) -> None:
    from dume.node.lifecycle import Reconnect
    from dume.shared.transport.download import fetch_version

    workdir = Workdir(args.workdir)
    stub = rpc.FederationStub(workdir.channel())
    retry = Reconnect(workdir.state()["coordinator"], args.deadline)
    with disk_full_is_one_line(args.out):
        version, count, total = fetch_version(stub, args.version, workdir.blobs(), args.out, workdir.own_blob,
                                              retry, args.stall_timeout)
    report(args, {"version": version.version, "exact": version.exact, "out": str(args.out),
                  "downloaded_blobs": count, "downloaded_bytes": total},
           f"wrote version {version.version} ({'exact' if version.exact else 'provisional'}) to {args.out}; "
           f"downloaded {count} blobs ({total / 1e6:.2f} MB), the rest was already here")


def run_status(args: argparse.Namespace) -> None:
    status = node_status(Workdir(args.workdir))
    print(json.dumps(status, sort_keys=True) if args.json else describe_status(status))


def run_leave(args: argparse.Namespace) -> None:
    from dume.node.agent import Agent

    version = Agent(Workdir(args.workdir)).leave()
    report(args, {"left": True, "version": version or None},
           f"left the federation; version {version} is published without this node" if version
           else "left the federation; no member with statistics remains")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dume-node", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="enrol and contribute this node's expert, then follow the federation")
    join.add_argument("--token", help="the join token from `dume-coordinator token` (not needed once enrolled)")
    join.add_argument("--token-file", type=Path, help="a file holding the join token (keeps it out of `ps`)")
    join.add_argument("--model", type=Path, required=True, help="the expert's Hugging Face directory")
    join.add_argument("--data", type=Path, required=True, help="its domain data (.jsonl, .txt or a directory)")
    join.add_argument("--workdir", type=Path, required=True, help="the node's working directory")
    join.add_argument("--once", action="store_true", help="exit once statistics are current instead of following")
    join.add_argument("--deadline", type=duration, default=600.0,
                      help="with --once, give up when the coordinator stays unreachable this long, e.g. 90s, 10m "
                           "(default 10m; without --once the agent keeps retrying, backing off up to 30s)")
    add_stall_timeout(join)
    join.add_argument("--chunk-kib", type=positive_int, default=DEFAULT_CHUNK_BYTES // 1024,
                      help="upload chunk size in KiB (default 1024, the most the coordinator takes)")
    join.add_argument("--max-rate-kib", type=positive_int, help="upload bandwidth limit in KiB/s")
    add_placement(join)
    add_log_format(join)
    join.add_argument("--max-tokens", type=positive_int,
                      help="statistics from at most this many tokens of the data (default: all of it)")
    join.set_defaults(run=run_join)
    fetch = commands.add_parser("fetch", help="download a published version as a Hugging Face directory")
    fetch.add_argument("--workdir", type=Path, required=True, help="the node's working directory")
    fetch.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    fetch.add_argument("--version", type=positive_int, default=0, help="version number (default: the latest)")
    fetch.add_argument("--deadline", type=duration, default=600.0,
                       help="give up when a download stays interrupted this long, e.g. 90s, 10m (default 10m; it "
                            "retries with backoff and resumes each blob from the bytes already received)")
    add_stall_timeout(fetch)
    add_json(fetch)
    fetch.set_defaults(run=run_fetch)
    status = commands.add_parser("status", help="what this node contributed, and to which version")
    status.add_argument("--workdir", type=Path, required=True, help="the node's working directory")
    add_json(status)
    status.set_defaults(run=run_status)
    leave = commands.add_parser("leave", help="take this node's contribution out of the federation")
    leave.add_argument("--workdir", type=Path, required=True, help="the node's working directory")
    add_json(leave)
    leave.set_defaults(run=run_leave)
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
    training.add_argument("--trainable", choices=TRAINABLE, default=defaults.trainable,
                          help="fine-tune only the MLPs (the default: DUME keeps them per expert and the rest stays "
                               "the base's, so the merge averages nothing away and joins never move the basis), or "
                               "all parameters")
    training.add_argument("--device", default=defaults.device, help="torch device to train on, e.g. cuda")
    training.set_defaults(run=run_train)
    add_config_command(commands, parser)
    return parser


def add_stall_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stall-timeout", type=duration, default=STALL_SECONDS,
                        help="cancel and resume a transfer that moves no byte this long, e.g. 30s (default 60s)")


def run_train(args: argparse.Namespace) -> None:
    from dume.shared.method.training import train

    settings = TrainSettings(args.steps, args.learning_rate, args.batch_size, args.sequence_length, args.seed,
                             args.trainable, args.device)
    print(f"wrote {train(args.base, args.data, args.out, settings)}")


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
