"""pyproject.toml's ranges and constraints.txt's pins agree, every install line of sdofm uses
the pins, and this environment holds them (so the tests ran on the versions they name)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and name.strip() and version.strip(), f"not NAME==VERSION: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    return [Requirement(r) for r in [*project["dependencies"], *(r for e in extras for r in e)]]


def test_pyproject_gives_ranges_that_admit_the_pins():
    pins = _constraints()
    for req in _requirements():
        assert not any(s.operator in ("==", "===") for s in req.specifier), (
            f"{req}: a range, not one version (the exact one goes to constraints.txt)"
        )
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
    for name in ("torch", "ray", "mlflow", "zarr", "numcodecs", "sunpy", "boto3", "botocore"):
        assert name in pins, f"constraints.txt pins {name}"
    # The local CPU build: a plain ==2.13.0 matches 2.13.0+cpu and a CUDA build alike.
    assert pins["torch"] == Version("2.13.0") and not pins["torch"].local


def test_every_install_of_sdofm_uses_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"^\t.*\bpip install\b.*$", makefile, re.M)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert re.search(r"^\$\(STAMP\):.*\bconstraints\.txt\b", makefile, re.M), "setup reruns"
    docker = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", docker, re.M)
    (run,) = re.findall(r"^RUN pip install\b.*$", docker, re.M)
    assert "-c constraints.txt" in run, run


def test_environment_holds_the_pinned_versions():
    pins = _constraints()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (str(version), installed[name])
        for name, version in pins.items()
        # A local label (torch's +cpu) is the build, not the release.
        if name in installed and Version(Version(installed[name]).public) != version
    }
    assert not wrong, f"installed versions differ from constraints.txt (make setup): {wrong}"
    assert Version(installed["torch"]).public == "2.13.0"
