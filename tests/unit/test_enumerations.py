"""Head kinds, job states, export formats and the training recipe's choices (objectives, class weightings,
scalings) are enumerated once: by the server (the registries in adapters/kinds.py and adapters/recipe.py, its
enums) and the protos. The client takes its values from its generated protos, the CLI its choices from the client,
the web page its choices from the OpenAPI document; and a client reads a value newer than itself instead of
failing on it."""

import argparse
import re
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import NamedTuple

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from adapters.active import STRATEGIES
from adapters.kinds import KINDS
from adapters.recipe import CLASS_WEIGHTINGS, OBJECTIVES, SCALINGS
from client import cli, models
from client._proto.graft.v1 import resources_pb2 as pb
from client._proto.graft.v1 import service_pb2 as api
from client._proto.graft.v1 import service_pb2_grpc as rpc
from client.base import Client
from client.grpc_client import GrpcClient
from client.http_client import HttpClient
from service.config import Settings
from service.errors import InvalidArgument
from service.grpc import convert
from service.grpc.gen.graft.v1 import resources_pb2 as server_pb
from service.grpc.gen.graft.v1 import service_pb2 as server_api
from service.http.app import create_app
from service.jobs import JobState
from service.kind_choice import AUTO_KIND, auto_description
from service.resources import ExportFormat, TrainingSpec
from service.store.windows import DriftStatus

STATIC = Path(__file__).parents[2] / "service" / "ui" / "static"
NEWER_KIND, NEWER_STATE = "knn", "paused"  # what a newer server may answer over HTTP
NEWER_NUMBER = 99  # ... and over gRPC, where an enum value this client does not know is only a number
NEWER_OPTIONS = {"objective": "macro_f1", "class_weighting": "sqrt", "scaling": "pca"}  # a newer server's recipe
NEWER_STATUS = "recovering"  # a drift status a newer server may answer
NEWER_STRATEGY = "entropy"  # a suggestion strategy a newer server may answer


class RecipeEnum(NamedTuple):
    """One of the recipe's registries (adapters/recipe.py), the TrainingSpec field that names one of its values,
    the proto enum of that field and its values' prefix there, and the client's copy of the values."""

    registry: dict
    field: str
    proto_enum: str
    prefix: str
    client_values: tuple[str, ...]


RECIPE_ENUMS = [
    RecipeEnum(OBJECTIVES, "objective", "Objective", "OBJECTIVE_", models.OBJECTIVES),
    RecipeEnum(CLASS_WEIGHTINGS, "class_weighting", "ClassWeighting", "CLASS_WEIGHTING_", models.CLASS_WEIGHTINGS),
    RecipeEnum(SCALINGS, "scaling", "FeatureScaling", "FEATURE_SCALING_", models.SCALINGS),
]
each_recipe_enum = pytest.mark.parametrize("recipe", RECIPE_ENUMS, ids=[r.field for r in RECIPE_ENUMS])
CREATE_TIME = "2026-01-01T00:00:00Z"


# --- every copy agrees with the source ------------------------------------------------------------------------


def test_the_clients_kinds_states_and_formats_are_the_servers():
    assert models.TRAINING_KINDS == (*KINDS, AUTO_KIND)
    assert models.HEAD_KINDS == tuple(KINDS)
    assert models.JOB_STATES == tuple(state.value for state in JobState)
    assert models.EXPORT_FORMATS == tuple(export_format.value for export_format in ExportFormat)
    assert models.DRIFT_STATUSES == tuple(status.value for status in DriftStatus)


@each_recipe_enum
def test_each_recipe_registry_is_its_proto_enum_and_the_clients_values(recipe):
    names = [f"{recipe.prefix}{name.upper()}" for name in recipe.registry]
    for protos in (pb, server_pb):  # the client's generated copy and the server's
        values = protos.DESCRIPTOR.enum_types_by_name[recipe.proto_enum].values
        assert [(v.number, v.name) for v in values] == list(enumerate([f"{recipe.prefix}UNSPECIFIED", *names]))
        assert protos.TrainingSpec.DESCRIPTOR.fields_by_name[recipe.field].enum_type.name == recipe.proto_enum
    assert recipe.client_values == tuple(recipe.registry)


@each_recipe_enum
def test_the_grpc_door_converts_every_recipe_value_both_ways(recipe):
    for number, name in enumerate(recipe.registry, start=1):
        fields = {recipe.field: number}
        message = server_pb.TrainingSpec(dataset="datasets/ds", head="h", kind=server_pb.HEAD_KIND_AUTO, **fields)
        request = convert.training_spec(message).request()
        assert getattr(request, recipe.field).value == name
        back = convert.message(TrainingSpec.of(request), server_pb.TrainingSpec)
        assert getattr(back, recipe.field) == number


def test_the_suggestion_strategies_are_the_registrys_in_both_protos_the_client_and_the_cli():
    names = [f"SUGGESTION_STRATEGY_{name.upper()}" for name in STRATEGIES]
    for protos in (api, server_api):  # the client's generated copy and the server's
        values = protos.DESCRIPTOR.enum_types_by_name["SuggestionStrategy"].values
        assert [(v.number, v.name) for v in values] == list(enumerate(["SUGGESTION_STRATEGY_UNSPECIFIED", *names]))
    assert models.SUGGESTION_STRATEGIES == tuple(STRATEGIES)
    assert cli_choices("suggest", "--strategy") == models.SUGGESTION_STRATEGIES


def test_the_grpc_door_reads_every_suggestion_strategy_and_refuses_an_unknown_number():
    for number, name in enumerate(STRATEGIES, start=1):
        assert convert.suggestion_strategy(number).value == name
    assert convert.suggestion_strategy(0) is None  # UNSPECIFIED: the server's default
    with pytest.raises(InvalidArgument, match="SUGGESTION_STRATEGY_DIVERSE_MARGIN"):
        convert.suggestion_strategy(NEWER_NUMBER)


def cli_choices(command: str, option: str) -> tuple[str, ...]:
    subcommands = next(a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction))
    return tuple(next(a for a in subcommands.choices[command]._actions if option in a.option_strings).choices)


def test_the_cli_offers_every_kind_and_format_the_client_knows():
    assert cli_choices("train", "--kind") == models.TRAINING_KINDS
    assert cli_choices("export", "--format") == models.EXPORT_FORMATS
    assert cli_choices("train", "--objective") == models.OBJECTIVES
    assert cli_choices("train", "--class-weighting") == models.CLASS_WEIGHTINGS
    assert cli_choices("train", "--scaling") == models.SCALINGS


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


@each_recipe_enum
def test_the_openapi_document_gives_the_page_every_recipe_value(schemas, recipe):
    field = schemas["TrainingSpec"]["properties"][recipe.field]
    component = next(option["$ref"] for option in field["anyOf"] if "$ref" in option)
    assert schemas[component.rsplit("/", 1)[1]]["enum"] == list(recipe.registry)


def test_the_openapi_document_says_which_kinds_take_scaling_and_class_weighting_as_the_page_reads_it(schemas):
    rules = schemas["TrainingSpec"]["allOf"]  # read as trainingKinds() in service/ui/static/train.js reads them

    def kinds_taking(field: str) -> list[str]:
        kinds = next(rule for rule in rules if field in rule["if"]["required"])["then"]["properties"]["kind"]["enum"]
        return [kind for kind in kinds if kind is not None]  # null: the kind unset, which is the default kind

    assert kinds_taking("scaling") == [name for name, spec in KINDS.items() if spec.scalings] + [AUTO_KIND]
    weighted = [name for name, spec in KINDS.items() if spec.class_weighting is not None]
    assert kinds_taking("class_weighting") == [*weighted, AUTO_KIND]


def test_the_web_page_names_no_kind_export_format_or_recipe_value_of_its_own():
    # 'auto' is left out: it is also the page's backbone choice (GET /v1/backbones lists the loaded ones only);
    # 'accuracy' too: it is also the hold-out metric the page shows.
    recipe = [name for r in RECIPE_ENUMS for name in r.registry if name != "accuracy"]
    names = [*KINDS, *(export_format.value for export_format in ExportFormat), *recipe]
    as_value = re.compile(rf"""["'`>=]({"|".join(names)})(?![\w-])""")  # a string, an option's value or text, a query
    found = {f"{path.name}: {match[0]}" for path in STATIC.iterdir() for match in as_value.finditer(path.read_text())}
    assert not found, "the page must list the kinds, formats and recipe values the service's /openapi.json gives"


# --- a newer server's values --------------------------------------------------------------------------------------


def newer_http_server(request: httpx.Request) -> httpx.Response:
    """A newer server's HTTP door: its job and version are of a kind, its monitoring in a status, and the job in a
    state and with recipe choices, this client lacks."""
    if request.url.path.endswith(":monitor"):
        return httpx.Response(200, json={"head": "h", "version": 1, "status": NEWER_STATUS})
    if request.url.path.endswith(":suggest"):
        found = {"dataset": "datasets/ds_1", "head_version": "heads/h/versions/1", "strategy": NEWER_STRATEGY}
        return httpx.Response(200, json=found)
    if request.url.path.startswith("/v1/jobs/"):
        spec = {"dataset": "datasets/ds_1", "head": "h", "kind": NEWER_KIND, **NEWER_OPTIONS}
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
        options = dict.fromkeys(NEWER_OPTIONS, NEWER_NUMBER)
        spec = pb.TrainingSpec(dataset="datasets/ds_1", head="h", kind=NEWER_NUMBER, **options)
        return pb.Job(name=request.name, state=NEWER_NUMBER, spec=spec, create_time=created())


class NewerHeads(rpc.HeadServiceServicer):
    def GetHeadMonitoring(self, request, context):
        return api.HeadMonitoring(head="h", version=1, status=NEWER_NUMBER)  # type: ignore[arg-type]

    def GetHeadVersion(self, request, context):
        return pb.HeadVersion(
            name=request.name, version=1, backbone="b", kind=NEWER_NUMBER, classes=["a", "b"], create_time=created()
        )


class NewerDatasets(rpc.DatasetServiceServicer):
    def SuggestExamples(self, request, context):
        return api.SuggestExamplesResponse(
            dataset=request.name,
            head_version="heads/h/versions/1",
            strategy=NEWER_NUMBER,  # type: ignore[arg-type]
        )


@pytest.fixture
def newer_grpc_server() -> Iterator[int]:
    """A newer server's gRPC door (the same answers, as numbers); its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_JobServiceServicer_to_server(NewerJobs(), server)
    rpc.add_HeadServiceServicer_to_server(NewerHeads(), server)
    rpc.add_DatasetServiceServicer_to_server(NewerDatasets(), server)
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


def read_recipe(client: Client) -> dict[str, str | None]:
    spec = client.get_job("jobs/j1").spec
    return {field: getattr(spec, field) for field in NEWER_OPTIONS}


def test_recipe_values_newer_than_the_client_come_through_over_http():
    with HttpClient("http://newer.invalid") as client:
        client._http.close()
        client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(newer_http_server))
        assert read_recipe(client) == NEWER_OPTIONS


def test_recipe_values_newer_than_the_client_come_through_over_grpc_as_their_numbers(newer_grpc_server):
    with GrpcClient(f"127.0.0.1:{newer_grpc_server}") as client:
        assert read_recipe(client) == dict.fromkeys(NEWER_OPTIONS, str(NEWER_NUMBER))


def test_a_drift_status_newer_than_the_client_comes_through_over_http():
    with HttpClient("http://newer.invalid") as client:
        client._http.close()
        client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(newer_http_server))
        assert client.monitor("h").status == NEWER_STATUS


def test_a_drift_status_newer_than_the_client_comes_through_over_grpc_as_its_number(newer_grpc_server):
    with GrpcClient(f"127.0.0.1:{newer_grpc_server}") as client:
        assert client.monitor("h").status == str(NEWER_NUMBER)


def test_a_suggestion_strategy_newer_than_the_client_comes_through_over_http():
    with HttpClient("http://newer.invalid") as client:
        client._http.close()
        client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(newer_http_server))
        assert client.suggest_examples("ds_1", "h").strategy == NEWER_STRATEGY


def test_a_suggestion_strategy_newer_than_the_client_comes_through_over_grpc_as_its_number(newer_grpc_server):
    with GrpcClient(f"127.0.0.1:{newer_grpc_server}") as client:
        assert client.suggest_examples("ds_1", "h").strategy == str(NEWER_NUMBER)
