"""Head kinds, job states and export formats are enumerated once: by the server (the head-kind registry in
adapters/kinds.py, its enums) and the protos. The client takes its values from its generated protos, the CLI its
choices from the client, the web page its choices from the OpenAPI document; and a client reads a value newer than
itself instead of failing on it."""

import argparse
import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from adapters.kinds import KINDS
from client import cli, models
from client._proto.graft.v1 import resources_pb2 as pb
from client._proto.graft.v1 import service_pb2_grpc as rpc
from client.base import Client
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from service.config import Settings
from service.http.app import create_app
from service.jobs import JobState
from service.kind_choice import AUTO_KIND, auto_description
from service.resources import ExportFormat

STATIC = Path(__file__).parents[2] / "service" / "ui" / "static"
NEWER_KIND, NEWER_STATE = "knn", "paused"  # what a newer server may answer over HTTP
NEWER_NUMBER = 99  # ... and over gRPC, where an enum value this client does not know is only a number
CREATE_TIME = "2026-01-01T00:00:00Z"


# --- every copy agrees with the source ------------------------------------------------------------------------


def test_the_clients_kinds_states_and_formats_are_the_servers():
    assert models.TRAINING_KINDS == (*KINDS, AUTO_KIND)
    assert models.HEAD_KINDS == tuple(KINDS)
    assert models.JOB_STATES == tuple(state.value for state in JobState)
    assert models.EXPORT_FORMATS == tuple(export_format.value for export_format in ExportFormat)


def cli_choices(command: str, option: str) -> tuple[str, ...]:
    subcommands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return tuple(next(a for a in subcommands.choices[command]._actions if option in a.option_strings).choices)


def test_the_cli_offers_every_kind_and_format_the_client_knows():
    assert cli_choices("train", "--kind") == models.TRAINING_KINDS
    assert cli_choices("export", "--format") == models.EXPORT_FORMATS


@pytest.fixture(scope="module")
def schemas() -> dict:
    return create_app(Settings(), lambda: None).openapi()["components"]["schemas"]


def test_the_openapi_document_gives_the_page_every_kind_with_its_description(schemas):
    assert schemas["TrainingKind"]["enum"] == [*KINDS, AUTO_KIND]
    descriptions = schemas["TrainingSpec"]["properties"]["kind"]["x-enumDescriptions"]
    assert descriptions == {name: spec.description for name, spec in KINDS.items()} | {AUTO_KIND: auto_description()}
    assert schemas["ExportFormat"]["enum"] == [export_format.value for export_format in ExportFormat]


def test_the_openapi_document_says_which_kinds_take_hyperparams_and_finetune_blocks_as_the_page_reads_it(schemas):
    rules = schemas["TrainingSpec"]["allOf"]  # read as trainingKinds() in service/ui/static/train.js reads them
    untuned = next(rule for rule in rules if rule["then"].get("properties", {}).get("hyperparams") == {"type": "null"})
    assert untuned["if"]["properties"]["kind"]["enum"] == [n for n, s in KINDS.items() if not s.searched] + [AUTO_KIND]
    blocks = next(rule for rule in rules if "finetune_blocks" in rule["if"]["required"])
    block_kinds = [
        kind for option in blocks["then"]["anyOf"] for kind in option["properties"].get("kind", {}).get("enum", [])
    ]
    assert block_kinds == [name for name, spec in KINDS.items() if spec.copies_tail]


def test_the_web_page_names_no_kind_or_export_format_of_its_own():
    # 'auto' is left out: it is also the page's backbone choice (GET /v1/backbones lists the loaded ones only).
    names = [*KINDS, *(export_format.value for export_format in ExportFormat)]
    as_value = re.compile(rf"""["'`>=]({"|".join(names)})(?![\w-])""")  # a string, an option's value or text, a query
    found = {f"{path.name}: {match[0]}" for path in STATIC.iterdir() for match in as_value.finditer(path.read_text())}
    assert not found, "the page must list the kinds and formats the service's /openapi.json gives"


# --- a newer server's values --------------------------------------------------------------------------------------


def newer_http_server(request: httpx.Request) -> httpx.Response:
    """A newer server's HTTP door: its job and version are of a kind, and the job in a state, this client lacks."""
    if request.url.path.startswith("/v1/jobs/"):
        spec = {"dataset": "datasets/ds_1", "head": "h", "kind": NEWER_KIND}
        job = {"name": "jobs/j1", "state": NEWER_STATE, "done": False, "spec": spec, "create_time": CREATE_TIME}
        return httpx.Response(200, json=job)
    version = {
        "name": "heads/h/versions/1",
        "version": 1,
        "backbone": "b",
        "kind": NEWER_KIND,
        "classes": ["a", "b"],
        "create_time": CREATE_TIME,
    }
    return httpx.Response(200, json=version)


def created() -> Timestamp:
    created = Timestamp()
    created.FromJsonString(CREATE_TIME)
    return created


class NewerJobs(rpc.JobServiceServicer):
    def GetJob(self, request, context):
        spec = pb.TrainingSpec(dataset="datasets/ds_1", head="h", kind=NEWER_NUMBER)
        return pb.Job(name=request.name, state=NEWER_NUMBER, spec=spec, create_time=created())


class NewerHeads(rpc.HeadServiceServicer):
    def GetHeadVersion(self, request, context):
        return pb.HeadVersion(
            name=request.name, version=1, backbone="b", kind=NEWER_NUMBER, classes=["a", "b"], create_time=created()
        )


@pytest.fixture
def newer_grpc_server() -> Iterator[int]:
    """A newer server's gRPC door (the same answers, as numbers); its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_JobServiceServicer_to_server(NewerJobs(), server)
    rpc.add_HeadServiceServicer_to_server(NewerHeads(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(grace=None)


def read_job_and_version(client: Client) -> tuple[str, str, str]:
    job = client.get_job("jobs/j1")
    return job.state, job.spec.kind, client.get_head_version("h", 1).kind


def test_a_kind_or_job_state_newer_than_the_client_comes_through_over_http():
    with HttpClient("http://newer.invalid") as client:
        client._http.close()
        client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(newer_http_server))
        assert read_job_and_version(client) == (NEWER_STATE, NEWER_KIND, NEWER_KIND)


def test_a_kind_or_job_state_newer_than_the_client_comes_through_over_grpc_as_its_number(newer_grpc_server):
    with GrpcClient(f"127.0.0.1:{newer_grpc_server}") as client:
        assert read_job_and_version(client) == (str(NEWER_NUMBER),) * 3
