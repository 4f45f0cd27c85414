"""``dume-node``: what runs on a member's host.

``join`` enrols with a join token and contributes the node's expert (an owner) or statistics toward another's (a
contributor), one named dataset each, then keeps them current; ``forget`` takes one dataset out; ``update``
replaces an owner's expert; ``fetch`` downloads a published version; ``leave`` takes the node out; ``train``
fine-tunes an expert.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dume.node.lifecycle import StopRequested, stop_on_signals
from dume.node.status import describe_status, node_status
from dume.node.workdir import NODE_DISK_FULL, Workdir
from dume.shared.commandline import (
    add_json,
    add_nproc,
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
from dume.shared.files import disk_full_is_one_line
from dume.shared.logs import add_log_format, configure_logging
from dume.shared.method.settings import (
    CHECKPOINT_EVERY_SECONDS,
    TRAINABLE,
    TrainSettings,
    check_unique_datasets,
    parse_dataset,
)
from dume.shared.transport.channels import DEFAULT_CHUNK_BYTES
from dume.shared.transport.stall import STALL_SECONDS
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2_grpc as rpc

if TYPE_CHECKING:
    from dume.node.agent import Agent
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
    datasets = given_datasets(args.data)
    if args.model is not None and not args.model.exists():
        raise DumeError(f"--model {args.model} does not exist: give the expert's model directory")
    for name, path in datasets.items():
        if not path.exists():
            raise DumeError(f"--data {path} (dataset {name}) does not exist: give the data the node contributes")
    # Everything that can be wrong here is refused before enrolling or sending a byte.
    if args.model is not None:
        ExpertDirectory(args.model)
    for path in datasets.values():
        check_documents(path)
    chosen = placement(args)
    check_workers(args, chosen, "dume-node join")
    with disk_full_is_one_line(args.workdir, NODE_DISK_FULL):
        _contribute(args, workdir, datasets, chosen)


def check_workers(args: argparse.Namespace, chosen: Placement, command: str) -> None:
    """``--nproc`` this machine can run, and one copy of the command (not N started by torchrun)."""
    from dume.shared.method.distributed_statistics import check_not_under_torchrun, check_processes

    check_not_under_torchrun(command)
    check_processes(args.nproc, chosen)


def given_datasets(items: list[str]) -> dict[str, Path]:
    """``--data [NAME=]PATH`` given once or more: dataset name -> path; a name given twice is refused."""
    datasets = [parse_dataset(item) for item in items]
    if any(dataset.node for dataset in datasets):
        raise DumeError("--data takes NAME=PATH: a node contributes only its own datasets")
    check_unique_datasets(datasets, "this node")
    return {dataset.name: dataset.path for dataset in datasets}


def _contribute(args: argparse.Namespace, workdir: Workdir, datasets: dict[str, Path], chosen: Placement) -> None:
    from dume.node.agent import Agent, enrol, say

    if args.token or args.token_file:
        token = JoinToken.decode(join_token(args.token, args.token_file))
        if workdir.enrolled() and workdir.state().get("name") not in (token.node, None):
            raise DumeError(f"{args.workdir} belongs to node {workdir.state()['name']!r}, the token is for "
                            f"{token.node!r}: use another --workdir")
        check_role(token.contributor, token.expert, args.model)
        enrol(token, workdir, args.model, datasets, args.deadline if args.once else None)
    elif not workdir.enrolled():
        raise DumeError(f"{args.workdir} holds no enrolled node: pass --token (from `dume-coordinator token`)")
    else:
        state = workdir.state()
        check_role(state["expert"] != state["name"], state["expert"], args.model)
        add_datasets(workdir, args.model, datasets)
    agent = Agent(workdir, args.chunk_kib * 1024, args.max_rate_kib * 1024 if args.max_rate_kib else 0.0,
                  chosen, args.max_tokens, args.deadline if args.once else None, args.stall_timeout, args.nproc,
                  args.checkpoint_every)
    agent.run(once=args.once)
    if args.once:
        say(completion("contribution", agent))


def check_role(contributor: bool, expert: str, model: Path | None) -> None:
    """An owner uploads its expert's weights (--model); a contributor computes with the owner's and sends none."""
    if contributor and model is not None:
        raise DumeError(f"this node contributes to expert {expert!r}, whose weights come from its owner: drop "
                        "--model (a contributor downloads the expert's weights and sends statistics only)")
    if not contributor and model is None:
        raise DumeError(f"this node owns expert {expert!r}: give its weights with --model MODEL_DIR")


def add_datasets(workdir: Workdir, model: Path | None, datasets: dict[str, Path]) -> None:
    """A node resumes with the model it enrolled with (`dume-node update` replaces it) and the datasets it has;
    datasets it does not have yet are added (their statistics alone are uploaded), and one it took out is not
    taken back under its name."""
    state = workdir.state()
    if model is not None and str(model.resolve()) != state["model"]:
        raise DumeError(f"{workdir.root} joined with --model {state['model']}, not {model.resolve()}: rejoin with the "
                        "same --model, or `dume-node update --model` to replace the expert's weights")
    known = dict(state["datasets"])
    for name, path in datasets.items():
        if name in state["removed_datasets"]:
            raise DumeError(f"dataset {name!r} was taken out of the federation: contribute it under another name")
        if name in known and known[name] != str(path.resolve()):
            raise DumeError(f"{workdir.root} contributes dataset {name!r} from {known[name]}, not {path.resolve()}: "
                            f"`dume-node forget --dataset {name}` first, or give it another name (NAME=PATH)")
        known[name] = str(path.resolve())
    if known != state["datasets"]:
        workdir.update(datasets=known)


def run_fetch(args: argparse.Namespace) -> None:
    from dume.node.lifecycle import Reconnect
    from dume.shared.transport.download import fetch_version

    workdir = Workdir(args.workdir)
    stub = rpc.FederationStub(workdir.channel())
    retry = Reconnect(workdir.state()["coordinator"], args.deadline)
    with disk_full_is_one_line(args.out, NODE_DISK_FULL):
        version, count, total = fetch_version(stub, args.version, workdir.blobs(), args.out, workdir.own_blob,
                                              retry, args.stall_timeout)
    report(args, {"version": version.version, "exact": version.exact, "out": str(args.out),
                  "downloaded_blobs": count, "downloaded_bytes": total},
           f"wrote version {version.version} ({'exact' if version.exact else 'provisional'}) to {args.out}; "
           f"downloaded {count} blobs ({total / 1e6:.2f} MB), the rest was already here")


def run_status(args: argparse.Namespace) -> None:
    status = node_status(Workdir(args.workdir))
    print(json.dumps(status, sort_keys=True) if args.json else describe_status(status))


def run_forget(args: argparse.Namespace) -> None:
    from dume.node.agent import Agent

    version = Agent(Workdir(args.workdir)).forget(args.dataset)
    report(args, {"forgotten": args.dataset, "version": version or None},
           f"forgot dataset {args.dataset}; version {version} is published without it" if version
           else f"forgot dataset {args.dataset}; no contribution remains, so no version was published")


def run_update(args: argparse.Namespace) -> None:
    """SIGTERM or SIGINT ends it cleanly (exit 0); run it again to carry on."""
    from dume.node.agent import say

    configure_logging(args.log_format, "%(message)s")
    try:
        with stop_on_signals():
            _update(args)
    except StopRequested as stop:
        say(f"stopped on {stop.signal_name}; run `dume-node update` again to carry on")


def _update(args: argparse.Namespace) -> None:
    from dume.node.agent import Agent, say
    from dume.shared.method.expert import ExpertDirectory
    from dume.shared.method.families import check_same_architecture

    workdir = Workdir(args.workdir)
    state = workdir.state()
    if state["expert"] != state["name"]:
        raise DumeError(f"this node contributes to expert {state['expert']!r}; only its owner updates its weights")
    if not args.model.exists():
        raise DumeError(f"--model {args.model} does not exist: give the new fine-tune's model directory")
    new, current = ExpertDirectory(args.model), ExpertDirectory(Path(state["model"]))
    try:
        check_same_architecture({"the current model": current.config, "the new model": new.config})
    except DumeError as error:
        raise DumeError(f"{args.model} cannot replace the expert: {error}") from None
    chosen = placement(args)
    check_workers(args, chosen, "dume-node update")
    with disk_full_is_one_line(args.workdir, NODE_DISK_FULL):
        agent = Agent(workdir, placement=chosen, max_tokens=args.max_tokens, give_up_after=args.deadline,
                      nproc=args.nproc, checkpoint_every=args.checkpoint_every)
        agent.contribute_model(args.model)
        say(f"uploaded the new weights of expert {state['expert']}; recomputing the statistics of every dataset")
        agent.run(once=True)
    say(completion("update", agent))


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
    join.add_argument("--model", type=Path, help="the expert's Hugging Face directory (an owner; a contributor to "
                      "another node's expert gives none)")
    join.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                      help="a dataset (.jsonl, .txt or a directory), named NAME (default: 'default'); repeat for "
                           "several, each contributed on its own; join again with one more to add it")
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
    add_nproc(join)
    add_log_format(join)
    join.add_argument("--max-tokens", type=positive_int,
                      help="statistics from at most this many tokens of the data (default: all of it)")
    add_checkpoint_every(join)
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
    forget = commands.add_parser("forget", help="take one dataset's statistics out of the federation")
    forget.add_argument("--workdir", type=Path, required=True, help="the node's working directory")
    forget.add_argument("--dataset", required=True, help="the dataset's name (see `dume-node status`)")
    add_json(forget)
    forget.set_defaults(run=run_forget)
    update = commands.add_parser("update", help="replace this owner's expert with a new fine-tune and recompute")
    update.add_argument("--workdir", type=Path, required=True, help="the node's working directory")
    update.add_argument("--model", type=Path, required=True, help="the new model directory (same architecture)")
    update.add_argument("--deadline", type=duration, default=600.0,
                        help="give up when the coordinator stays unreachable this long (default 10m)")
    add_placement(update)
    add_nproc(update)
    add_log_format(update)
    update.add_argument("--max-tokens", type=positive_int,
                        help="statistics from at most this many tokens of each dataset (default: all of it)")
    add_checkpoint_every(update)
    update.set_defaults(run=run_update)
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


def completion(what: str, agent: Agent) -> str:
    """The last line of a `join --once` or an `update`: complete only when no statistics wait for approval."""
    if agent.held:
        return (f"{what} uploaded; the statistics of {', '.join(sorted(agent.held))} wait for the operator's "
                "approval (`dume-coordinator status` shows them)")
    return f"{what} complete; statistics are current"


def add_checkpoint_every(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint-every", type=duration, default=CHECKPOINT_EVERY_SECONDS,
                        help="save a statistics run's partial sums this often, so that a node killed mid-run resumes "
                             "there, e.g. 2m (default 10m)")


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
