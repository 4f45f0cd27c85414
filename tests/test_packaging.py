"""The tested torch build is what the README's set-up and CI install, and it lies inside the declared range."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "pip install -c constraints.txt -e '.[test]'"


def test_constraints_pin_a_torch_that_the_declared_range_accepts():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    declared = {Requirement(line).name: Requirement(line) for line in lines}
    pins = [Requirement(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    torch_pin = next(pin for pin in pins if pin.name == "torch")
    version = re.fullmatch(r"==(\S+)", str(torch_pin.specifier)).group(1)
    assert declared["torch"].specifier.contains(version), (declared["torch"], version)
    assert not declared["torch"].specifier.contains("3.0"), "torch's range must stop below the next major version"
    for pin in pins:
        assert pin.name in declared, f"constraints.txt pins {pin.name}, which pyproject.toml does not depend on"


def test_readme_set_up_and_ci_install_through_the_constraints():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert INSTALL in readme
    assert INSTALL.replace("pip install", "pip install --quiet") in ci
    assert "HF_HUB_OFFLINE=1 python -m pytest -q" in readme and "python -m pytest -q" in ci
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
