"""The federation end to end: real coordinator and node processes, real mutual TLS on loopback, real files.

The reference for every exact version is `dume merge` over the same experts and data with the same settings.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import time
from dataclasses import replace

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from dume.node.agent import Agent, Upload, described, model_upload
from dume.node.workdir import Workdir
from dume.shared.errors import DumeError
from dume.shared.lab.harness import Federation, cli, differing_files, wait_until
from dume.shared.lab.tiny import build_tiny_model
from dume.shared.method.merge import merge
from dume.shared.method.routers import MergeSettings
from dume.shared.method.statistics import statistics_tensors
from dume.shared.transport.wire import safetensors_ranges
from dume.shared.trust import pki
from dume.shared.trust.join_token import JoinToken, new_secret
from dume.v1 import federation_pb2 as pb
from dume.v1 import federation_pb2_grpc as rpc
from dume.v1 import tensors_pb2

SETTINGS = MergeSettings(sequence_length=64)


@pytest.fixture(scope="module")
def experts(expert_factory):
    return expert_factory("llama")


@pytest.fixture(scope="module")
def reference(experts, tmp_path_factory):
    """``build(names)``: the local `dume merge` of those members (cached)."""
    root, built = tmp_path_factory.mktemp("reference"), {}

    def build(names: tuple[str, ...]):
        if names not in built:
            built[names] = merge([experts[name] for name in names], root / "-".join(names), SETTINGS)
        return built[names]

    return build


@pytest.fixture
def federation(tmp_path):
    created = []

    def make(*settings: str) -> Federation:
        """A coordinator initialised on fixed free ports (so that a restarted daemon listens where its nodes
        expect it), whose nodes' output the tests read from pipes."""
        created.append(Federation(tmp_path / f"federation-{len(created)}", pipe_nodes=True))
        created[-1].init("--sequence-length", "64", *settings, fixed_ports=True)
        return created[-1]

    yield make
    for each in created:
        each.close()


@pytest.mark.scenario("exact unlearning")
def test_concurrent_joins_give_the_merge_bytes_then_revocation_gives_the_never_joined_bytes(
        experts, reference, federation, tmp_path, record):
    fed = federation()
    fed.serve()
    tokens = {name: fed.token(name) for name in experts}
    agents = {name: fed.join(name, spec.model_dir, spec.data_path, tokens[name]) for name, spec in experts.items()}
    status = fed.wait_exact(["code", "math", "prose"])
    record.lost(["code", "math", "prose"], status)
    assert not differing_files(fed.export(tmp_path / "all"), reference(("code", "math", "prose")))

    revoked = json.loads(fed.admin("revoke", "prose", "--reason", "left the consortium", "--json").stdout)
    assert revoked == {"revoked": "prose", "version": status["version"] + 1}  # published at once (provisional)
    assert agents["prose"].wait(timeout=60) == 5  # exit code 5: this node's identity is refused
    assert "revoked (left the consortium)" in agents["prose"].stderr.read()
    exact = fed.wait_exact(["code", "math"])
    exported = json.loads(fed.admin("export", "--out", str(tmp_path / "after-revoke"), "--json").stdout)
    assert exported == {"version": exact["version"], "exact": True, "out": str(tmp_path / "after-revoke")}
    assert not differing_files(tmp_path / "after-revoke", reference(("code", "math")))
    record.count("revocations checked byte for byte")

    refused = cli("node", "fetch", "--workdir", str(fed.workdir("prose")), "--out", str(tmp_path / "x"),
                  check=False)
    assert refused.returncode == 5 and "was revoked" in refused.stderr
    declined = fed.admin("token", "--node", "prose", check=False)  # exit code 3: the coordinator declines
    assert declined.returncode == 3 and "was revoked" in declined.stderr
    unknown = fed.admin("revoke", "nobody", check=False)
    assert unknown.returncode == 3 and "no member 'nobody'" in unknown.stderr
    fetched = json.loads(cli("node", "fetch", "--workdir", str(fed.workdir("code")), "--out",
                             str(tmp_path / "fetched"), "--json").stdout)
    assert fetched["version"] == exact["version"] and fetched["exact"] is True
    assert fetched["downloaded_blobs"] > 0 and fetched["downloaded_bytes"] > 0
    assert not differing_files(tmp_path / "fetched", reference(("code", "math")))
    issued = json.loads(fed.admin("token", "--node", "later", "--expires", "1h", "--json").stdout)
    assert issued["node"] == "later" and JoinToken.decode(issued["token"]).node == "later"
    assert 3500 < issued["expires_at"] - time.time() <= 3600
    log = json.loads(fed.admin("audit", "--json").stdout)["entries"]
    assert [entry["sequence"] for entry in log] == list(range(1, len(log) + 1))
    revocations = [(entry["subject"], entry["detail"]) for entry in log if entry["kind"] == "revoke"]
    assert revocations == [("prose", {"reason": "left the consortium"})]
    verified = json.loads(fed.admin("audit", "--verify", "--json").stdout)
    assert verified == {"intact": True, "entries": len(log), "last_hash": log[-1]["entry_hash"]}
    left = json.loads(cli("node", "leave", "--workdir", str(fed.workdir("math")), "--json").stdout)
    assert set(left) == {"left", "version"} and left["left"] is True
    assert {p["version"]: p["members"] for p in fed.publications()}[left["version"]] == ["code"]
    assert fed.stop("node-code") == 0  # following the federation, it stops cleanly on SIGTERM
    assert "stopped on SIGTERM" in agents["code"].stderr.read()
    fed.stop("node-math")
    assert fed.stop() == 0
    away = cli("node", "fetch", "--workdir", str(fed.workdir("code")), "--out", str(tmp_path / "y"), check=False)
    assert away.returncode == 4 and "not reachable" in away.stderr  # exit code 4: no coordinator answers
    stopped = fed.admin("status", check=False)
    assert stopped.returncode == 4 and "no coordinator daemon is running" in stopped.stderr


def test_a_member_joining_later_gets_a_provisional_version_then_an_exact_one_with_the_same_bytes(
        experts, reference, federation, tmp_path):
    fed = federation()
    fed.serve()
    joined = []
    for name in ("prose", "math"):  # the reverse of the first test's order, one at a time
        spec = experts[name]
        fed.join(name, spec.model_dir, spec.data_path, fed.token(name))
        joined.append(name)
        fed.wait_exact(joined)
    before = fed.status()["version"]
    late = fed.join("code", experts["code"].model_dir, experts["code"].data_path, fed.token("code"), "--once")
    assert late.wait(timeout=120) == 0, late.stderr.read()
    fed.wait_exact(["code", "math", "prose"])
    after_join = [p for p in fed.publications() if p["version"] > before]
    assert after_join[0]["exact"] is False and "code" in after_join[0]["members"]
    assert after_join[-1]["exact"] is True
    assert not differing_files(fed.export(tmp_path / "all"), reference(("code", "math", "prose")))
    fed.close()


def test_experts_sharing_their_non_mlp_weights_join_without_moving_the_basis(experts, federation, tmp_path):
    """MLP-only experts all average to the base, so a joiner is included in a basis with an unchanged hash."""
    base = build_tiny_model("llama", tmp_path / "base")
    specs = []
    for name in ("code", "math"):
        out = tmp_path / name
        cli("node", "train", "--base", str(base), "--data", str(experts[name].data_path), "--out", str(out),
            "--steps", "3", "--sequence-length", "64", "--trainable", "mlp")
        specs.append(replace(experts[name], model_dir=out))
    fed = federation()
    fed.serve()
    fed.join("code", specs[0].model_dir, specs[0].data_path, fed.token("code"))
    first = fed.wait_exact(["code"])
    fed.join("math", specs[1].model_dir, specs[1].data_path, fed.token("math"))
    fed.wait_exact(["code", "math"])
    after_join = [p for p in fed.publications() if p["version"] > first["version"]]
    assert [p["exact"] for p in after_join] == [True]  # code's statistics stayed current: nothing provisional
    assert after_join[0]["basis_hash"] == first["basis_hash"]
    assert not differing_files(fed.export(tmp_path / "both"), merge(specs, tmp_path / "reference", SETTINGS))


@pytest.mark.scenario("processes killed")
def test_an_upload_resumes_after_the_coordinator_is_killed_and_restarted(experts, reference, federation, tmp_path,
                                                                          record):
    fed = federation()
    fed.serve()
    spec = experts["math"]
    node = fed.join("math", spec.model_dir, spec.data_path, fed.token("math"), "--once",
                    "--chunk-kib", "8", "--max-rate-kib", "48")  # ~0.15 MB model: about 3 s of upload
    uploads = fed.state / "uploads"
    wait_until(lambda: any(part.stat().st_size > 16384 for part in uploads.glob("*/*.part")), 60,
               "the upload to be under way")
    assert fed.stop(signum=signal.SIGKILL) == -signal.SIGKILL
    record.count("faults injected")
    fed.serve()
    assert node.wait(timeout=180) == 0
    log = node.stderr.read()
    assert "model upload interrupted" in log
    total, sent = (float(x) for x in re.search(r"uploaded model: ([\d.]+) MB \(([\d.]+) MB sent\)", log).groups())
    assert sent < 1.5 * total  # resumed from the durable offset, not from zero
    record.lost(["math"], fed.wait_exact(["math"]))
    assert not differing_files(fed.export(tmp_path / "out"), reference(("math",)))
    assert "intact" in fed.admin("audit", "--verify").stdout


def _refused_join(fed: Federation, name: str, model, data, token: str, exit_code: int = 3) -> str:
    """The one error line of a join that fails with ``exit_code`` (3: refused by the coordinator, 2: bad input)."""
    process = fed.join(name, model, data, token, "--once")
    assert process.wait(timeout=120) == exit_code
    error = process.stderr.read().strip().splitlines()[-1]
    assert error.startswith("dume-node: error: ")
    return error


def _stable(status: dict) -> dict:
    return {**status, "members": [{**m, "online": None} for m in status["members"]]}


@pytest.mark.scenario("bad joins")
def test_bad_tokens_foreign_uploads_bad_models_and_bad_statistics_are_refused_and_change_nothing(
        experts, federation, tmp_path, record):
    fed = federation()
    fed.serve()

    def refused(*args) -> str:
        record.count("bad inputs tried")
        return _refused_join(fed, *args)

    code, math = experts["code"], experts["math"]
    token = fed.token("code")
    assert fed.join("code", code.model_dir, code.data_path, token, "--once").wait(timeout=120) == 0
    fed.wait_exact(["code"])
    before = _stable(fed.status())

    assert "already used" in refused("again", code.model_dir, code.data_path, token)
    expiring = fed.admin("token", "--node", "late", "--expires", "1s").stdout.strip()
    time.sleep(1.5)
    assert "expired" in refused("late", code.model_dir, code.data_path, expiring)
    decoded = JoinToken.decode(fed.token("stranger"))
    unknown = replace(decoded, secret=new_secret()).encode()
    assert "not issued by this coordinator" in refused("stranger", code.model_dir, code.data_path, unknown)
    foreign_ca = pki.fingerprint(pki.create_authority()[1])
    foreign = replace(decoded, ca_fingerprint=foreign_ca).encode()
    assert "another coordinator" in refused("stranger", code.model_dir, code.data_path, foreign, 2)

    wide = build_tiny_model("llama", tmp_path / "wide", intermediate_size=96)
    # Refused from its plan, before a byte is sent: its MLP shapes are not the federation's.
    assert "F32[32, 96], the federation's is F32[32, 64]" in refused("wide", wide, math.data_path, fed.token("wide"))
    poisoned = tmp_path / "poisoned"
    shutil.copytree(math.model_dir, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    assert "NaN" in refused("poisoned", poisoned, math.data_path, fed.token("poisoned"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")  # refused before enrolling: no member "empty" appears below
    assert "no non-empty documents" in refused("empty", code.model_dir, empty, fed.token("empty"), 2)
    assert _stable(fed.status())["members"] == before["members"] + [
        {"name": name, "expert": name, "online": None, "state": "enrolled", "stats_current": False,
         "token_count": 0} for name in ("poisoned", "wide")]

    # Calls made with the enrolled nodes' own certificates, as a modified node would.
    code_stub = rpc.FederationStub(Workdir(fed.workdir("code")).channel())
    wide_stub = rpc.FederationStub(Workdir(fed.workdir("wide")).channel())
    plan = model_upload(code.model_dir, "code").plan
    opened = code_stub.BeginUpload(plan)
    record.count("bad inputs tried")
    with pytest.raises(grpc.RpcError) as denied:
        wide_stub.SendChunks(iter([pb.Chunk(upload_id=opened.upload_id, sha256=opened.blobs[0].sha256, offset=0,
                                            data=b"x")]))
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED and "belongs to 'code'" in denied.value.details()

    basis = fed.status()["basis_hash"]
    for gram_fault, message in (("count", "count"), ("cauchy", "Cauchy-Schwarz"), ("basis", "never issued"),
                                ("indefinite", "not positive definite"), ("inflated", "RMS-normalised")):
        record.count("bad inputs tried")
        with pytest.raises(DumeError, match=message):
            _upload_statistics(fed, code, basis, gram_fault, tmp_path / gram_fault)
    after = fed.status()
    assert (after["version"], after["exact"], after["basis_hash"]) == (before["version"], True, before["basis_hash"])
    assert [m for m in _stable(fed.status())["members"] if m["name"] == "code"] == before["members"]


def _upload_statistics(fed: Federation, spec, basis: str, fault: str, path) -> None:
    """Uploads hand-made statistics for ``code`` with one fault, through the node's own upload path."""
    hidden, layers, count = 32, 2, 100
    gram = torch.eye(hidden + 1, dtype=torch.float64)[None].repeat(layers, 1, 1)
    gram[:, -1, -1] = count
    if fault == "count":
        gram[1, -1, -1] = count + 1
    if fault == "cauchy":
        gram[0, 0, 1] = gram[0, 1, 0] = 5.0
    if fault == "indefinite":  # every 2x2 minor is fine, yet an eigenvalue is -0.2
        gram[0, :3, :3] = torch.full((3, 3), -0.6) + 1.6 * torch.eye(3)
    if fault == "inflated":  # 200 per feature: more than 100 tokens of normalised hidden states can carry
        gram[1, :hidden, :hidden] *= 200
    save_file(statistics_tensors(gram), str(path))
    entries, sources = described(safetensors_ranges(path))
    header = tensors_pb2.StatisticsHeader(basis_hash="f" * 64 if fault == "basis" else basis, hidden_size=hidden,
                                          num_layers=layers, token_count=count, sequence_length=64,
                                          dataset="default")
    plan = pb.UploadPlan(kind=pb.UPLOAD_KIND_STATISTICS, manifest=tensors_pb2.TensorManifest(tensors=entries),
                         statistics=header)
    Agent(Workdir(fed.workdir("code"))).upload(Upload(plan, sources, "statistics"))
