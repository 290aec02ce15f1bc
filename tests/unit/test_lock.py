"""One lock installs graft everywhere: the dev venv, the Bento and the image install requirements.lock's versions."""

import re
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"


def locked() -> dict[str, str]:
    """name -> pinned version, from requirements.lock."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", LOCK.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def project_dependencies() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"]]


def test_the_lock_satisfies_every_dependency_pyproject_declares():
    pins = locked()
    for requirement in project_dependencies():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, which pyproject.toml's {requirement} excludes: "
            "run `make lock`"
        )


def test_the_lock_pins_the_torch_builds_graft_is_tested_with():
    assert locked()["torch"] == "2.14.1"
    assert locked()["torchvision"] == "0.29.1"


def test_the_dev_venv_runs_exactly_the_locked_versions():
    differing = {}
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            differing[name] = (version, None)
            continue
        if installed != version:
            differing[name] = (version, installed)
    assert not differing, f"locked vs installed (run `make setup` after changing the lock): {differing}"


def test_the_bento_installs_the_lock_and_nothing_else():
    python = yaml.safe_load((REPO / "bentofile.yaml").read_text())["python"]
    assert (REPO / python["requirements_txt"]).resolve() == LOCK
    assert python["lock_packages"] is False  # BentoML would otherwise resolve its own versions
    assert "packages" not in python
