"""The federation end to end: real coordinator and node processes, real mutual TLS on loopback, real files.

The reference for every exact version is `dume merge` over the same experts and data with the same settings.
"""

from __future__ import annotations

import pytest

from dume.shared.merge import MergeSettings, merge

from federation_harness import NODE, Federation, run, same_files, terminate, wait_until

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
        created.append(Federation(tmp_path / f"federation-{len(created)}", *settings))
        return created[-1]

    yield make
    for each in created:
        each.close()


def export(fed: Federation, out, version: int | None = None):
    fed.admin("export", "--out", str(out), *(["--version", str(version)] if version else []))
    return out


def test_concurrent_joins_give_the_merge_bytes_then_revocation_gives_the_never_joined_bytes(
        experts, reference, federation, tmp_path):
    fed = federation()
    fed.start()
    tokens = {name: fed.token(name) for name in experts}
    agents = {name: fed.join(name, spec.model_dir, spec.data_path, tokens[name]) for name, spec in experts.items()}
    status = fed.wait_exact(["code", "math", "prose"])
    assert not same_files(export(fed, tmp_path / "all"), reference(("code", "math", "prose")))

    revoked = fed.admin("revoke", "prose", "--reason", "left the consortium")
    assert f"version {status['version'] + 1}" in revoked.stdout  # published at once (provisional)
    assert agents["prose"].wait(timeout=60) != 0
    assert "revoked (left the consortium)" in agents["prose"].stderr.read()
    fed.wait_exact(["code", "math"])
    assert not same_files(export(fed, tmp_path / "after-revoke"), reference(("code", "math")))

    refused = run([*NODE, "fetch", "--workdir", str(fed.workdir("prose")), "--out",
                   str(tmp_path / "x")], check=False)
    assert refused.returncode == 2 and "was revoked" in refused.stderr
    assert "was revoked" in fed.admin("token", "--node", "prose", check=False).stderr
    fetched = run([*NODE, "fetch", "--workdir", str(fed.workdir("code")), "--out", str(tmp_path / "fetched")])
    assert "wrote version" in fetched.stdout
    assert not same_files(tmp_path / "fetched", reference(("code", "math")))
    assert "intact" in fed.admin("audit", "--verify").stdout
    for name in ("code", "math"):
        terminate(agents[name])
    assert fed.stop() == 0


def test_a_member_joining_later_gets_a_provisional_version_then_an_exact_one_with_the_same_bytes(
        experts, reference, federation, tmp_path):
    fed = federation()
    fed.start()
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
    assert not same_files(export(fed, tmp_path / "all"), reference(("code", "math", "prose")))
    fed.close()
