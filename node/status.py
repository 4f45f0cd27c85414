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
    datasets = {}
    for name, path in sorted(state["datasets"].items()):
        basis, weights = state["uploaded"].get(name, [None, None])
        computed = [t for t in transfers if t["event"] == "statistics" and t.get("basis") == basis
                    and t.get("dataset", "default") == name]
        datasets[name] = {"path": path, "basis": basis, "expert_hash": weights,
                          "tokens": computed[-1]["tokens"] if computed else None}
    status = {
        "name": state["name"], "expert": state["expert"], "owner": state["expert"] == state["name"],
        "coordinator": state["coordinator"], "model": state.get("model"), "left": bool(state.get("left")),
        "model_uploaded": bool(state.get("model_upload")),
        "model_bytes": models[-1]["bytes"] if models else None,
        "datasets": datasets, "removed_datasets": state["removed_datasets"],
    }
    status["federation"] = _federation_view(workdir, state["name"], state["expert"], datasets)
    return status


def _federation_view(workdir: Workdir, name: str, expert: str, datasets: dict[str, Any]) -> dict[str, Any]:
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
        "in_basis": expert in event.basis_members,
        "statistics_current": bool(datasets) and all(
            [d["basis"], d["expert_hash"]] == [event.basis_hash, event.expert_hash] for d in datasets.values()),
        "in_version": bool(version) and name in version.members,
    }


def describe_status(status: dict[str, Any]) -> str:
    """The lines a person reads."""
    lines = [f"node {status['name']} of the coordinator at {status['coordinator']}"
             + (" (left the federation)" if status["left"] else "")]
    if not status["owner"]:
        lines.append(f"contributes to expert {status['expert']} (its weights come from its owner)")
    elif status["model_uploaded"]:
        size = f" ({status['model_bytes'] / 1e6:.2f} MB)" if status["model_bytes"] is not None else ""
        lines.append(f"owns expert {status['expert']}; model: {status['model']} uploaded{size}")
    else:
        lines.append(f"owns expert {status['expert']}; model: {status['model']} not uploaded yet")
    for name, dataset in status["datasets"].items():
        if dataset["basis"]:
            tokens = f"{dataset['tokens']} tokens" if dataset["tokens"] is not None else "uploaded"
            lines.append(f"dataset {name}: {tokens} under basis {dataset['basis'][:12]} ({dataset['path']})")
        else:
            lines.append(f"dataset {name}: not uploaded yet ({dataset['path']})")
    if status["removed_datasets"]:
        lines.append(f"taken out of the federation: {', '.join(status['removed_datasets'])}")
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
