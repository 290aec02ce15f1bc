"""graft-client on its own: its wheel in an empty virtualenv (no torch, no server code) drives a real server.

The wheel is built from client/pyproject.toml and installed with pip, which resolves its
dependencies from the configured indexes, so a missing or torch-pulling requirement fails
here. That venv's own `graft` then uploads, trains, predicts over both doors and exports.
"""

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.sample_data import textile_dir
from harness.servers import make_tenant_key, start_server

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["global", "local", "nominal"]
PER_CLASS = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("server"))
    yield server
    server.stop()


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run in ``cwd`` outside the repository (its folders must not be importable), without the dev venv's variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GRAFT_", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    clean |= {"PYTHONNOUSERSITE": "1", "GRAFT_CONFIG": "/nonexistent/graft.toml"} | (env or {})
    return subprocess.run(
        [str(c) for c in command], cwd=cwd, env=clean, capture_output=True, text=True, timeout=300, check=False
    )


def install_client(tmp_path: Path) -> tuple[Path, Path, float]:
    """`pip wheel --no-deps ./client`, then `python -m venv` and `pip install` of that wheel: (wheel, venv, seconds).

    The wheel is built from a copy: an in-tree setuptools build leaves build/ and *.egg-info behind.
    """
    source = shutil.copytree(
        REPO / "client",
        tmp_path / "src" / "client",
        ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"),
    )
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", source, "-w", tmp_path / "dist", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("graft_client-*.whl")
    started, venv = time.monotonic(), tmp_path / "venv"
    made = run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    installed = run(
        venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=tmp_path
    )
    assert installed.returncode == 0, installed.stderr
    return wheel, venv, time.monotonic() - started


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Iterator[Future[tuple[Path, Path, float]]]:
    """install_client in a thread, while the server starts (the test asks for this fixture first)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool.submit(install_client, tmp_path_factory.mktemp("client"))


def test_the_client_wheel_installs_without_torch_and_runs_the_quickstart(client_venv, server, tmp_path):
    wheel, venv, seconds = client_venv.result()
    print(f"python -m venv + pip install of the client wheel: {seconds:.1f} s")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"client", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "client/cli.py" in names and "client/_proto/graft/v1/service_pb2_grpc.py" in names
    assert not [name for name in names if "test" in name or name.endswith("pyproject.toml")]

    assert run(venv / "bin" / "python", "-m", "pip", "show", "torch", cwd=tmp_path).returncode != 0
    probe = (
        "import importlib.util, sys, client.cli\n"
        "print([m for m in ('torch', 'torchvision', 'service', 'adapters', 'harness')"
        " if m in sys.modules or importlib.util.find_spec(m)])"
    )
    found = run(venv / "bin" / "python", "-c", probe, cwd=tmp_path)
    assert found.returncode == 0 and found.stdout.strip() == "[]", found.stdout + found.stderr

    images = tmp_path / "textiles"
    for label in CLASSES:
        (images / label).mkdir(parents=True)
        for path in sorted((textile_dir() / label).glob("*.jpg"))[:PER_CLASS]:
            shutil.copy(path, images / label / path.name)
    held_out = sorted((textile_dir() / "local").glob("*.jpg"))[100]

    key = make_tenant_key(server, "wheel")

    def graft(*args: str | Path, url: str = server.http_url) -> subprocess.CompletedProcess:
        return run(venv / "bin" / "graft", *args, cwd=tmp_path, env={"GRAFT_URL": url, "GRAFT_API_KEY": key})

    upload = graft("upload", images, "--name", "textiles")
    assert upload.returncode == 0, upload.stderr
    assert f"{3 * PER_CLASS} images, 3 classes" in upload.stdout + upload.stderr
    train = graft("train", "textiles", "--head", "weave", "--hyperparams", '{"epochs": 5}')
    assert train.returncode == 0, train.stderr
    assert "heads/weave/versions/1: succeeded" in train.stdout + train.stderr

    for url in (server.http_url, f"grpc://{server.grpc_target}"):
        predict = graft("predict", "weave", held_out, "--json", url=url)
        assert predict.returncode == 0, predict.stderr
        assert json.loads(predict.stdout)["heads"][0]["top"][0]["label"] in CLASSES

    exported = graft("export", "weave", "--format", "safetensors", "-o", tmp_path / "weave.safetensors")
    assert exported.returncode == 0, exported.stderr
    weights = (tmp_path / "weave.safetensors").read_bytes()  # an 8-byte header length, then a JSON header
    assert any(name.endswith("weight") for name in json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")]))

    # matplotlib is the `report` extra, not a dependency: graft report says how to get it.
    report = graft("report", "weave", "-o", tmp_path / "report.png")
    assert report.returncode == 2 and "pip install 'graft-client[report]'" in report.stderr, report.stderr
    assert report.stderr.count("\n") == 1 and not (tmp_path / "report.png").exists()
