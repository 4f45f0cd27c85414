"""``dume-node status``: what this node contributed and to which version, from its working directory and, when
the coordinator answers, from what it publishes."""

from __future__ import annotations

from typing import Any

import grpc

from dume.node.workdir import Workdir
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc

ASK_SECONDS = 10.0


def node_status(workdir: Workdir) -> dict[str, Any]:
    """One JSON-ready object: the node's own record, and the coordinator's view (``reachable`` False if none)."""
    state = workdir.state()
    transfers = workdir.transfers()
    models = [t for t in transfers if t["event"] == "upload" and t.get("what") == "model"]
    basis = state.get("statistics_basis")
    computed = [t for t in transfers if t["event"] == "statistics" and t.get("basis") == basis]
    status = {
        "name": state["name"], "coordinator": state["coordinator"], "model": state.get("model"),
        "data": state.get("data"), "left": bool(state.get("left")),
        "model_uploaded": bool(state.get("model_upload")),
        "model_bytes": models[-1]["bytes"] if models else None,
        "statistics_basis": basis,
        "statistics_tokens": computed[-1]["tokens"] if computed else None,
    }
    status["federation"] = _federation_view(workdir, state["name"], basis)
    return status


def _federation_view(workdir: Workdir, name: str, basis: str | None) -> dict[str, Any]:
    stub = rpc.FederationStub(workdir.channel())
    stream = None
    try:
        stream = stub.Watch(pb.WatchRequest(), timeout=ASK_SECONDS)
        event = next(stream)
        version = stub.GetVersion(pb.VersionRequest(version=0), timeout=ASK_SECONDS) if event.version else None
    except grpc.RpcError as error:
        return {"reachable": False, "error": f"{error.code().name}: {error.details()}"}
    finally:
        if stream is not None:
            stream.cancel()
    return {
        "reachable": True, "version": event.version, "exact": event.exact, "basis_hash": event.basis_hash,
        "in_basis": name in event.basis_members,
        "statistics_current": bool(basis) and basis == event.basis_hash,
        "in_version": bool(version) and name in version.members,
    }


def describe_status(status: dict[str, Any]) -> str:
    """The lines a person reads."""
    lines = [f"node {status['name']} of the coordinator at {status['coordinator']}"
             + (" (left the federation)" if status["left"] else "")]
    if status["model_uploaded"]:
        size = f" ({status['model_bytes'] / 1e6:.2f} MB)" if status["model_bytes"] is not None else ""
        lines.append(f"model: {status['model']} uploaded{size}")
    else:
        lines.append(f"model: {status['model']} not uploaded yet")
    if status["statistics_basis"]:
        tokens = f"{status['statistics_tokens']} tokens" if status["statistics_tokens"] is not None else "uploaded"
        lines.append(f"statistics: {tokens} under basis {status['statistics_basis'][:12]}")
    else:
        lines.append("statistics: none uploaded yet")
    view = status["federation"]
    if not view["reachable"]:
        lines.append(f"coordinator: not reachable now ({view['error']})")
    elif not view["version"]:
        lines.append("coordinator: no version published yet")
    else:
        kind = "exact" if view["exact"] else "provisional"
        included = "includes this node" if view["in_version"] else "does not include this node"
        current = "current" if view["statistics_current"] else "stale: run `dume-node join` to recompute them"
        lines.append(f"coordinator: version {view['version']} ({kind}) {included}; this node's statistics are "
                     f"{current}")
    return "\n".join(lines)
