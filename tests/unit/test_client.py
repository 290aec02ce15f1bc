"""The client package on its own: fresh stubs, no torch, the contract's field names, retries, the report."""

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from adapters.metrics import ECE_BINS, evaluate
from client import cli, models
from client._proto.graft.v1 import resources_pb2 as pb
from client._proto.graft.v1 import service_pb2 as api
from client.errors import (
    GraftError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    error_for,
    error_for_status,
)
from client.report import draw
from client.retry import RetryPolicy

REPO = Path(__file__).resolve().parents[2]
CHECKED_IN = REPO / "client" / "_proto"


def test_client_grpc_stubs_are_generated_from_the_current_protos(tmp_path):
    subprocess.run([sys.executable, "scripts/gen_client_protos.py", str(tmp_path / "gen")], cwd=REPO, check=True)
    fresh = {p.relative_to(tmp_path / "gen"): p.read_text() for p in (tmp_path / "gen").rglob("*.py*")}
    current = {
        p.relative_to(CHECKED_IN): p.read_text() for p in CHECKED_IN.rglob("*.py*") if "__pycache__" not in p.parts
    }
    stale = sorted(str(path) for path in fresh.keys() | current.keys() if fresh.get(path) != current.get(path))
    assert not stale, f"stale generated files {stale}: run `python scripts/gen_client_protos.py`"


def test_the_client_and_the_cli_import_neither_torch_nor_the_server():
    code = (
        "import sys, client, client.cli, client.report\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'service', 'adapters'))\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# What client/ imports, by distribution (graft-client must require exactly these; stdlib and client itself aside).
DISTRIBUTIONS = {
    "httpx": "httpx",
    "grpc": "grpcio",
    "google.protobuf": "protobuf",
    "google.api": "googleapis-common-protos",
    "pydantic": "pydantic",
    "matplotlib": "matplotlib",
    "numpy": "numpy",
}


def _third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in (*sys.stdlib_module_names, "client"):
                found.add(
                    DISTRIBUTIONS.get(name.split(".")[0]) or DISTRIBUTIONS.get(".".join(name.split(".")[:2]), name)
                )
    return found


def _client_sources(pattern: str) -> list[Path]:
    return [p for p in (REPO / "client").rglob(pattern) if "build" not in p.relative_to(REPO / "client").parts]


def test_graft_client_requires_what_client_imports_at_the_servers_version_and_floors():
    client = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())
    server = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    project = client["project"]
    assert project["version"] == server["version"]
    required, report = project["dependencies"], project["optional-dependencies"]["report"]
    assert set(required + report) <= set(server["dependencies"]).union(*server["optional-dependencies"].values())

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", requirement)[0] for requirement in requirements}

    core = set().union(*(_third_party_imports(p) for p in _client_sources("*.py") if p.name != "report.py"))
    assert core == names(required)  # matplotlib and numpy only in `graft report`: the `report` extra
    assert _third_party_imports(REPO / "client" / "report.py") - core == names(report)

    packages = {".".join(("client", *p.parent.relative_to(REPO / "client").parts)) for p in _client_sources("*.py")}
    assert packages == set(client["tool"]["setuptools"]["packages"])  # a new subpackage must be listed to ship


def test_graft_report_without_matplotlib_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where graft-client is installed without [report]
    monkeypatch.delitem(sys.modules, "client.report")
    assert cli.main(["--url", "http://127.0.0.1:9", "report", "pets"]) == cli.EXIT_USAGE
    assert "pip install 'graft-client[report]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (models.Backbone, pb.Backbone),
        (models.Dataset, pb.Dataset),
        (models.Job, pb.Job),
        (models.TrainingSpec, pb.TrainingSpec),
        (models.BatchPredictionSpec, pb.BatchPredictionSpec),
        (models.BatchPrediction, pb.BatchPrediction),
        (models.HyperParams, pb.HyperParams),
        (models.SearchSpace, pb.SearchSpace),
        (models.HeadVersion, pb.HeadVersion),
        (models.Head, pb.Head),
        (models.ImagePrediction, api.ImagePrediction),
        (models.HeadPrediction, api.HeadPrediction),
        (models.LabelScore, api.LabelScore),
        (models.DatasetAudit, pb.DatasetAudit),
        (models.LabelSuspect, pb.LabelSuspect),
        (models.DuplicatePair, pb.DuplicatePair),
        (models.AuditedExample, pb.AuditedExample),
        (models.HeadComparisons, api.CompareHeadVersionsResponse),
        (models.HeadComparison, api.HeadComparison),
        (models.PredictionFeedback, api.PredictionFeedback),
        (models.FeedbackVerdict, api.FeedbackVerdict),
        (models.HeadMonitoring, api.HeadMonitoring),
        (models.MonitorWindow, api.MonitorWindow),
        (models.DriftTest, api.DriftTest),
        (models.LiveAccuracy, api.LiveAccuracy),
    ],
)
def test_client_models_have_exactly_the_protos_field_names(model, message):
    assert set(model.model_fields) == set(message.DESCRIPTOR.fields_by_name)


def test_errors_keep_the_servers_code_and_message_whichever_door():
    over_http = error_for_status(404, "not_found", "head 'x' not found", details={"head": "x"})
    over_grpc = error_for("NOT_FOUND", "head 'x' not found")
    assert isinstance(over_http, NotFound) and isinstance(over_grpc, NotFound)
    assert str(over_http) == str(over_grpc) == "not_found: head 'x' not found"
    assert isinstance(error_for_status(413, "payload_too_large", "too big"), InvalidArgument)
    assert isinstance(error_for_status(503, None, "draining"), Unavailable)


def test_retries_only_what_the_server_refused_for_now_and_honours_retry_after():
    slept: list[float] = []
    answers = iter([Unavailable("draining"), ResourceExhausted("queue full", retry_after_s=7), "ok"])

    def attempt():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert RetryPolicy(attempts=3).call(attempt, sleep=slept.append) == "ok"
    assert slept[1] == 7  # Retry-After, not the backoff

    calls = []

    def refuse(error: GraftError):
        calls.append(error)
        raise error

    for error in (NotFound("gone"), ResourceExhausted("storage quota")):  # no Retry-After: waiting will not help
        with pytest.raises(type(error)):
            RetryPolicy(attempts=3).call(lambda error=error: refuse(error), sleep=slept.append)
    assert len(calls) == 2


def test_stored_metrics_carry_the_reliability_curve_and_the_report_draws_them(tmp_path):
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    metrics = evaluate(logits, torch.tensor([0, 1, 2, 1, 1]), ["cat", "dog", "eel"])
    assert len(metrics.reliability) == ECE_BINS and sum(b.count for b in metrics.reliability) == 5
    gaps = sum(b.count / 5 * abs(b.accuracy - b.confidence) for b in metrics.reliability if b.count)
    assert metrics.ece == pytest.approx(gaps)

    trials = [
        {"hp": {"lr": 0.1, "weight_decay": wd}, "val_accuracy": acc, "val_loss": 0.5}
        for wd, acc in ((0.01, 0.6), (0.1, 0.8))
    ]
    stored = metrics.model_dump(mode="json") | {"trials": trials}
    version = models.HeadVersion(
        name="heads/pets/versions/2",
        version=2,
        backbone="mobilenet_v2",
        kind="linear",
        classes=["cat", "dog", "eel"],
        metrics=stored,
        create_time="2026-01-01T00:00:00Z",
    )
    head = models.Head(name="heads/pets", latest_version=2, versions=[version], aliases={"prod": 2})
    assert head.version("prod") is version and head.version() is version and version.display == "pets@2"
    draw(version, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_report_of_a_version_without_evaluation_says_what_to_do(tmp_path):
    version = models.HeadVersion(
        name="heads/pets/versions/1",
        version=1,
        backbone="b",
        kind="linear",
        classes=["a"],
        metrics={},
        create_time="2026-01-01T00:00:00Z",
    )
    with pytest.raises(ValueError, match="train it again"):
        draw(version, tmp_path / "r.png")
