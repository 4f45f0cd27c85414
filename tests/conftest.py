"""Shared fixtures: tiny experts of the real architectures, built locally once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded from a model hub

from dume.shared.lab.tiny import SYNTHETIC_TEMPLATES, build_tiny_model, perturb_mlps, synthetic_documents  # noqa: E402
from dume.shared.method.merge import ExpertSpec  # noqa: E402

from scorecard import record, register  # noqa: E402, F401  (the fixture that counts for docs/reliability.md)

FAMILIES = ("llama", "mistral", "qwen3")


def pytest_configure(config):
    register(config)  # the reliability scorecard (tests/scorecard.py)
DOMAINS = SYNTHETIC_TEMPLATES


def write_domain_text(path: Path, domain: str, documents: int = 30, offset: int = 0) -> Path:
    path.write_text("\n".join(synthetic_documents(domain, documents, offset)) + "\n")
    return path


@pytest.fixture(scope="session")
def expert_factory(tmp_path_factory):
    """``make(family)`` -> {name: ExpertSpec} for three distinct experts fine-tuned (perturbed) from one base."""
    cache: dict[str, dict[str, ExpertSpec]] = {}

    def make(family: str) -> dict[str, ExpertSpec]:
        if family not in cache:
            root = tmp_path_factory.mktemp(f"experts-{family}")
            base = build_tiny_model(family, root / "base")
            specs = {}
            for seed, name in enumerate(sorted(DOMAINS), start=1):
                model = perturb_mlps(base, root / name, seed=seed, scale=0.5)
                data = write_domain_text(root / f"{name}.txt", name)
                specs[name] = ExpertSpec(name, model, data)
            cache[family] = specs
        return cache[family]

    return make


@pytest.fixture
def coordinator(tmp_path):
    """The real Coordinator below gRPC on a fresh state directory (see ``in_process``), closed after the test."""
    from in_process import make_coordinator

    coordinator = make_coordinator(tmp_path / "coordinator")
    yield coordinator
    coordinator.close()


@pytest.fixture(scope="module")
def hostile(expert_factory, tmp_path_factory):
    """A real coordinator daemon with a published member, a hostile member and a revoked one (see ``hostile``)."""
    from hostile import serving

    with serving(expert_factory("llama"), tmp_path_factory.mktemp("hostile")) as running:
        yield running
