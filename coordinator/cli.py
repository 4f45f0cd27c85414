"""``dume-coordinator``: create a federation, run its daemon, and administer it.

``token``, ``status``, ``revoke``, ``export``, ``audit`` and ``gc`` talk to the running daemon with the admin identity
that ``init`` wrote into the state directory; they never open its database behind its back.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import grpc

from dume.coordinator import health, messages
from dume.coordinator.backup import backup, restore
from dume.coordinator.probe import DEFAULT_FLAG_RATIO, DEFAULT_PROBE_TOKENS, ProbeSettings
from dume.coordinator.state_dir import StateDir, initialise, split_address
from dume.shared.commandline import (
    add_json,
    add_merge_settings,
    duration,
    merge_settings,
    positive_float,
    positive_int,
    report,
    run_cli,
)
from dume.shared.config import add_config_command
from dume.shared.errors import DumeError
from dume.shared.logs import add_log_format, configure_logging
from dume.shared.method.settings import DEFAULT_DATASET
from dume.shared.transport.blobs import BlobStore, sha256_file
from dume.shared.transport.channels import mutual_tls_channel, refusal
from dume.shared.trust import pki
from dume.shared.trust.audit import verify_chain
from dume.shared.trust.join_token import JoinToken
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc


def admin_channel(state: StateDir) -> grpc.Channel:
    state.config()  # fails first with "not a state directory" where that is the problem
    address = state.daemon_addresses()["listen"]
    return mutual_tls_channel(address, pki.read_bytes(state.ca_cert, "the CA certificate"),
                              pki.read_bytes(state.admin_key, "the admin key"),
                              pki.read_bytes(state.admin_cert, "the admin certificate"))


def admin_stubs(state: StateDir) -> tuple[rpc.AdminStub, rpc.FederationStub]:
    channel = admin_channel(state)
    return rpc.AdminStub(channel), rpc.FederationStub(channel)


# init, serve and export import torch on first use, so that `--help` and the admin calls answer at once.
def run_init(args: argparse.Namespace) -> None:
    from dume.shared.method.expert import ExpertDirectory
    from dume.shared.method.writer import TOKENIZER_FILES

    architecture = None
    if args.architecture:
        expert = ExpertDirectory(args.architecture, "the architecture model")
        files = {name: sha256_file(args.architecture / name) for name in TOKENIZER_FILES
                 if (args.architecture / name).is_file()}
        architecture = messages.architecture_of(expert.config, messages.layout_manifest(expert.tensor_layout()),
                                                files)
    state = initialise(args.state, args.listen, args.enrolment_listen, args.advertise, args.enrolment_advertise,
                       merge_settings(args), architecture)
    print(f"initialised {state.root}; start it with `dume-coordinator serve --state {state.root}`")


def run_serve(args: argparse.Namespace) -> int:
    from dume.coordinator.daemon import serve

    configure_logging(args.log_format, "%(asctime)s %(name)s %(message)s")
    probe = None
    if args.probe_data:
        probe = ProbeSettings(args.probe_data, args.probe_tokens, args.probe_flag_ratio)
        probe.check()  # a missing or empty probe text stops `serve` before it binds a port
    return serve(StateDir(args.state), args.drain_seconds, args.metrics_listen, probe)


def run_token(args: argparse.Namespace) -> None:
    admin, _ = admin_stubs(StateDir(args.state))
    try:
        token = admin.CreateToken(pb.TokenRequest(node=args.node, ttl_seconds=args.expires,
                                                  expert=args.expert or "")).token
    except grpc.RpcError as error:
        raise refusal(error, f"cannot create a token for {args.node!r}") from None
    decoded = JoinToken.decode(token)
    report(args, {"node": args.node, "expert": decoded.expert, "token": token, "expires_at": decoded.expires_at},
           token)


def status_object(state: StateDir) -> dict:
    admin, _ = admin_stubs(state)
    try:
        status = admin.Status(pb.StatusRequest())
    except grpc.RpcError as error:
        raise refusal(error, "cannot read the status") from None
    return messages.status_dict(status)


def run_status(args: argparse.Namespace) -> None:
    status = status_object(StateDir(args.state))
    if args.json:
        print(json.dumps(status, sort_keys=True))
        return
    version = status["version"]
    print(f"version {version} ({'exact' if status['exact'] else 'provisional'})" if version else "no version yet")
    print(f"basis {status['basis_hash'] or '-'}; audit log: {status['audit_entries']} entries")
    if status["publication_error"]:
        print(f"publication failing, the latest version is behind the ledger: {status['publication_error']}")
    print("members:")
    for member in status["members"]:
        flags = ["online" if member["online"] else "offline",
                 "statistics current" if member["stats_current"] else "statistics stale or missing"]
        reason = f" ({member['reason']})" if member.get("reason") else ""
        role = "owner" if member["expert"] == member["name"] else f"contributes to {member['expert']}"
        print(f"  {member['name']:<20} {member['state']:<9}{reason} {role}; {', '.join(flags)}")
    print("experts:")
    for expert in status["experts"]:
        contributors = f", contributors {', '.join(expert['contributors'])}" if expert["contributors"] else ""
        weights = (expert["expert_hash"] or "")[:12] or "not uploaded"
        print(f"  {expert['name']:<20} owner {expert['owner']}{contributors}; weights {weights}")
        for c in expert["contributions"]:
            print(f"    {c['node'] + '/' + c['dataset']:<30} {c['token_count']:>10} tokens, basis "
                  f"{c['basis_hash'][:12]}, {'current' if c['current'] else 'stale'}")
        for c in expert["pending"]:
            print(f"    {c['node'] + '/' + c['dataset']:<30} {c['token_count']:>10} tokens, HELD for approval, in no "
                  f"version: `dume-coordinator approve {c['node']} --dataset {c['dataset']}` (or --refuse)")
    print_routing(status)


def print_routing(status: dict) -> None:
    """Each expert's share of routing on the probe text next to its share of the federation's tokens."""
    routing = status["routing"]
    if routing is None:
        return
    if routing["error"]:
        print(f"routing probe of version {routing['version']} failed: {routing['error']}")
        return
    tokens = {expert["name"]: sum(c["token_count"] for c in expert["contributions"]) for expert in status["experts"]}
    total = sum(tokens.values()) or 1
    fair = 1 / len(routing["shares"])
    print(f"routing on the probe text (version {routing['version']}, {routing['tokens']} tokens; flagged above "
          f"{routing['flag_ratio']:g}x the fair share {fair:.1%}):")
    for name, share in routing["shares"].items():
        flag = "  FLAGGED: takes more routing than its peers; check its statistics" if share["flagged"] else ""
        print(f"  {name:<20} routing {share['share']:6.1%}  tokens {tokens.get(name, 0) / total:6.1%}{flag}")


def run_revoke(args: argparse.Namespace) -> None:
    admin, _ = admin_stubs(StateDir(args.state))
    try:
        response = admin.Revoke(pb.RevokeRequest(node=args.name, reason=args.reason, dataset=args.dataset or ""))
    except grpc.RpcError as error:
        raise refusal(error, f"cannot revoke {args.name!r}") from None
    if args.dataset:
        what = f"dataset {args.dataset} of {args.name}"
        if response.publication_error:
            raise DumeError(f"took {what} out of the ledger, but {response.publication_error}: see `dume-coordinator "
                            "status` and the daemon's log")
        report(args, {"revoked": args.name, "dataset": args.dataset, "version": response.version or None},
               f"revoked {what}; version {response.version} published without it" if response.version
               else f"revoked {what}; no contribution remains, so no version was published")
        return
    if response.publication_error:
        raise DumeError(f"revoked {args.name} (its certificate is refused), but {response.publication_error}: "
                        "see `dume-coordinator status` and the daemon's log")
    report(args, {"revoked": args.name, "version": response.version or None},
           f"revoked {args.name}; version {response.version} published without it" if response.version
           else f"revoked {args.name}; no member with statistics remains, so no version was published")


def run_approve(args: argparse.Namespace) -> None:
    admin, _ = admin_stubs(StateDir(args.state))
    label = f"{args.node}/{args.dataset}"
    try:
        response = admin.Approve(pb.ApproveRequest(node=args.node, dataset=args.dataset, refuse=args.refuse))
    except grpc.RpcError as error:
        raise refusal(error, f"cannot {'refuse' if args.refuse else 'approve'} {label}") from None
    decided = "refused" if args.refuse else "approved"
    if response.publication_error:
        raise DumeError(f"{decided} {label}, but {response.publication_error}: see `dume-coordinator status`")
    if args.refuse:
        prose = f"refused {label}: its dataset is out of the federation; latest version {response.version or '-'}"
    else:
        prose = f"approved {label}; version {response.version} published with it"
    report(args, {decided: label, "version": response.version or None}, prose)


def run_export(args: argparse.Namespace) -> None:
    from dume.shared.transport.download import fetch_version

    state = StateDir(args.state)
    _, federation = admin_stubs(state)
    version, _, _ = fetch_version(federation, args.version, BlobStore(state.root / "export-cache"), args.out)
    report(args, {"version": version.version, "exact": version.exact, "out": str(args.out)},
           f"wrote version {version.version} ({'exact' if version.exact else 'provisional'}) to {args.out}")


def run_audit(args: argparse.Namespace) -> None:
    admin, _ = admin_stubs(StateDir(args.state))
    try:
        entries = [messages.audit_entry(entry) for entry in admin.Audit(pb.AuditRequest()).entries]
    except grpc.RpcError as error:
        raise refusal(error, "cannot read the audit log") from None
    if args.verify or args.anchor:
        try:
            count = verify_chain(entries, args.anchor)
        except ValueError as error:
            raise DumeError(f"the audit log is broken: {error}") from None
        last = entries[-1].entry_hash if entries else None
        report(args, {"intact": True, "entries": count, "last_hash": last},
               f"audit log intact: {count} entries, last hash {last or '-'}")
        return
    if args.json:
        print(json.dumps({"entries": [{**asdict(entry), "detail": json.loads(entry.detail_json)}
                                      for entry in entries]}, sort_keys=True))
        return
    for entry in entries:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry.at))
        print(f"{entry.sequence:>5} {stamp} {entry.kind:<10} {entry.subject:<20} {entry.detail_json} "
              f"{entry.entry_hash[:16]}")


def run_gc(args: argparse.Namespace) -> None:
    admin, _ = admin_stubs(StateDir(args.state))
    request = pb.GarbageRequest(prune_versions_before=args.prune_versions_before or 0, dry_run=args.dry_run)
    try:
        collected = asdict(messages.garbage_report(admin.CollectGarbage(request)))
    except grpc.RpcError as error:
        raise refusal(error, "cannot collect garbage") from None
    done = "would delete" if args.dry_run else "deleted"
    report_line = (
        f"{done} {collected['blobs']} blobs ({collected['bytes'] / 1e6:.2f} MB): "
        f"{collected['orphaned_blobs']} orphaned, {collected['member_blobs']} of revoked or departed members "
        f"({', '.join(collected['members']) or 'none'}), {collected['version_blobs']} of pruned versions "
        f"({', '.join(map(str, collected['pruned_versions'])) or 'none'}), {collected['basis_blobs']} of old bases; "
        f"{collected['uploads']} staged uploads ({collected['upload_bytes'] / 1e6:.2f} MB), "
        f"{collected['temporary_files']} temporary files")
    report(args, collected, report_line)


def run_health(args: argparse.Namespace) -> None:
    status = health.check(admin_channel(StateDir(args.state)))
    if status != "SERVING":
        raise DumeError(f"the coordinator on {args.state} is {status} (starting, catching up, or draining): "
                        "wait, or see its log")
    print(status)


def run_backup(args: argparse.Namespace) -> None:
    count, size = backup(StateDir(args.state), args.out)
    print(f"backed up {args.state} to {args.out}: ledger snapshot, identity and {count} blobs ({size / 1e6:.2f} MB)")


def run_restore(args: argparse.Namespace) -> None:
    for address in (args.listen, args.enrolment_listen):
        if address:
            split_address(address)  # refused before anything is unpacked
    count = restore(args.source, args.state)
    moved = {key: value for key, value in (("listen", args.listen), ("enrolment_listen", args.enrolment_listen))
             if value}
    if moved:
        StateDir(args.state).update_config(**moved)
    print(f"restored {args.source} into {args.state} ({count} blobs, each checked); start it with "
          f"`dume-coordinator serve --state {args.state}`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dume-coordinator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("--state", type=Path, required=True, help="the coordinator's state directory")
        sub.set_defaults(run=run)
        return sub

    init = command("init", "create a federation: CA, admin identity and settings", run_init)
    init.add_argument("--listen", default="127.0.0.1:7600", help="HOST:PORT for members and admins (mutual TLS)")
    init.add_argument("--enrolment-listen", default="127.0.0.1:7601", help="HOST:PORT for enrolment (server TLS)")
    init.add_argument("--advertise", help="HOST:PORT nodes should dial for --listen (default: the bound address)")
    init.add_argument("--enrolment-advertise", help="HOST:PORT nodes should dial for enrolment")
    init.add_argument("--architecture", type=Path, help="a model directory fixing the federation's architecture "
                      "(default: the first member's)")
    add_merge_settings(init)
    served = command("serve", "run the coordinator daemon in the foreground (SIGTERM drains and exits 0)", run_serve)
    served.add_argument("--drain-seconds", type=duration, default=10.0,
                        help="on SIGTERM, how long calls in flight may take to finish (default 10s)")
    served.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics over HTTP on this address (default: no metrics endpoint)")
    served.add_argument("--probe-data", type=Path, metavar="PATH",
                        help="a public probe text (.txt, .jsonl or a directory): each published version runs over "
                        "it and `status` shows each expert's share of routing (default: no probe; it holds one "
                        "copy of the version's model in memory)")
    served.add_argument("--probe-tokens", type=positive_int, default=DEFAULT_PROBE_TOKENS,
                        help=f"tokens of the probe text to run (default {DEFAULT_PROBE_TOKENS})")
    served.add_argument("--probe-flag-ratio", type=positive_float, default=DEFAULT_FLAG_RATIO,
                        help="flag an expert whose routing share exceeds this multiple of the fair share 1/E "
                        f"(default {DEFAULT_FLAG_RATIO:g})")
    add_log_format(served)
    token = command("token", "print a one-time join token for a node", run_token)
    token.add_argument("--node", required=True, help="the node's name in the federation")
    token.add_argument("--expert", help="an existing expert the node will feed with statistics as a contributor "
                       "(default: the node owns an expert named after it and uploads its weights)")
    token.add_argument("--expires", type=duration, default=86400.0, help="lifetime, e.g. 30m, 12h, 7d (default 1d)")
    add_json(token)
    status = command("status", "show the published version, the members, and the experts with their contributions",
                     run_status)
    add_json(status)
    revoke = command("revoke", "remove a member's contribution exactly and refuse its certificate", run_revoke)
    revoke.add_argument("name", help="the member to revoke")
    revoke.add_argument("--reason", default="", help="recorded in the ledger and the audit log")
    revoke.add_argument("--dataset", help="revoke only this dataset of the member (its statistics); the member and "
                        "its other contributions stay")
    add_json(revoke)
    approve = command("approve", "record statistics held for approval (limits.approve_tokens_above_ratio), or refuse "
                      "them", run_approve)
    approve.add_argument("node", help="the node whose statistics are held")
    approve.add_argument("--dataset", default=DEFAULT_DATASET, help="the held dataset (default: default)")
    approve.add_argument("--refuse", action="store_true", help="refuse instead: the dataset is taken out of the "
                         "federation and its node stops sending it")
    add_json(approve)
    export = command("export", "write a published version as a Hugging Face directory", run_export)
    export.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    export.add_argument("--version", type=positive_int, default=0, help="version number (default: the latest)")
    add_json(export)
    command("health", "ask the running daemon's gRPC health service; exit 0 when it is SERVING", run_health)
    saved = command("backup", "write a consistent copy of the state directory, also while the daemon runs",
                    run_backup)
    saved.add_argument("--out", type=Path, required=True, help="the archive to write (a new .tar file)")
    restored = command("restore", "recreate a state directory from a backup (--state must be new or empty)",
                       run_restore)
    restored.add_argument("--from", dest="source", type=Path, required=True, help="the archive `backup` wrote")
    restored.add_argument("--listen", help="HOST:PORT to listen on instead of the backed-up one (a new host)")
    restored.add_argument("--enrolment-listen", help="HOST:PORT for enrolment instead of the backed-up one")
    audit = command("audit", "show the hash-chained audit log, or verify it", run_audit)
    audit.add_argument("--verify", action="store_true", help="check every entry's hash chain")
    audit.add_argument("--anchor", metavar="HASH", help="verify, and require this entry: a last hash an earlier "
                       "verification printed, kept off this host (catches entries cut off the end of the log, or a "
                       "log rewritten from some entry on)")
    add_json(audit)
    collected = command("gc", "delete blobs and staged uploads nothing needs (revoked members', orphans, pruned "
                        "versions')", run_gc)
    collected.add_argument("--prune-versions-before", type=positive_int, metavar="N",
                           help="also delete the versions numbered below N (the latest is always kept)")
    collected.add_argument("--dry-run", action="store_true", help="report what would go, delete nothing")
    add_json(collected)
    add_config_command(commands, parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)
