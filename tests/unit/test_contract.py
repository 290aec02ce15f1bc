"""The protos are the contract: the HTTP door's OpenAPI document must say the same thing (fields and routes)."""

import re

import pytest
from google.api import annotations_pb2
from google.protobuf.descriptor import Descriptor

from service.config import Settings
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.http.app import create_app
from service.training import TrainRequest

# OpenAPI component -> the proto message whose fields it must have, exactly.
SAME_FIELDS: dict[str, Descriptor] = {
    "Backbone": pb.Backbone.DESCRIPTOR,
    "Dataset": pb.Dataset.DESCRIPTOR,
    "DatasetAudit": pb.DatasetAudit.DESCRIPTOR,
    "LabelSuspect": pb.LabelSuspect.DESCRIPTOR,
    "DuplicatePair": pb.DuplicatePair.DESCRIPTOR,
    "AuditedExample": pb.AuditedExample.DESCRIPTOR,
    "Example": pb.Example.DESCRIPTOR,
    "ListExamplesResponse": api.ListExamplesResponse.DESCRIPTOR,
    "SuggestExamplesResponse": api.SuggestExamplesResponse.DESCRIPTOR,
    "ExampleSuggestion": api.ExampleSuggestion.DESCRIPTOR,
    "ExampleLabel": api.ExampleLabel.DESCRIPTOR,
    "BatchUpdateExamplesResponse": api.BatchUpdateExamplesResponse.DESCRIPTOR,
    "ImportLabelsResponse": api.ImportLabelsResponse.DESCRIPTOR,
    "TrainingSpec": pb.TrainingSpec.DESCRIPTOR,
    "SearchSpace": pb.SearchSpace.DESCRIPTOR,
    "HyperParamOverrides": pb.HyperParams.DESCRIPTOR,
    "Job": pb.Job.DESCRIPTOR,
    "BatchPredictionSpec": pb.BatchPredictionSpec.DESCRIPTOR,
    "BatchPrediction": pb.BatchPrediction.DESCRIPTOR,
    "ListBatchPredictionsResponse": api.ListBatchPredictionsResponse.DESCRIPTOR,
    "HeadVersion": pb.HeadVersion.DESCRIPTOR,
    "Head": pb.Head.DESCRIPTOR,
    "HeadComparison": api.HeadComparison.DESCRIPTOR,
    "CompareHeadVersionsResponse": api.CompareHeadVersionsResponse.DESCRIPTOR,
    "HeadMonitoring": api.HeadMonitoring.DESCRIPTOR,
    "MonitorWindow": api.MonitorWindow.DESCRIPTOR,
    "LiveAccuracy": api.LiveAccuracy.DESCRIPTOR,
    "DriftTest": api.DriftTest.DESCRIPTOR,
    "PredictionFeedback": api.PredictionFeedback.DESCRIPTOR,
    "FeedbackVerdict": api.FeedbackVerdict.DESCRIPTOR,
    "ListBackbonesResponse": api.ListBackbonesResponse.DESCRIPTOR,
    "ListDatasetsResponse": api.ListDatasetsResponse.DESCRIPTOR,
    "ListJobsResponse": api.ListJobsResponse.DESCRIPTOR,
    "ListHeadsResponse": api.ListHeadsResponse.DESCRIPTOR,
    "PredictRequest": api.PredictRequest.DESCRIPTOR,
    "PredictResponse": api.PredictResponse.DESCRIPTOR,
    "ImagePrediction": api.ImagePrediction.DESCRIPTOR,
    "HeadPrediction": api.HeadPrediction.DESCRIPTOR,
    "LabelScore": api.LabelScore.DESCRIPTOR,
    "Webhook": pb.Webhook.DESCRIPTOR,
    "WebhookDelivery": pb.WebhookDelivery.DESCRIPTOR,
    "ListWebhooksResponse": api.ListWebhooksResponse.DESCRIPTOR,
    "ListWebhookDeliveriesResponse": api.ListWebhookDeliveriesResponse.DESCRIPTOR,
}
# RPCs HTTP/1.1 cannot carry (a bidirectional stream), said so in service.proto.
GRPC_ONLY = {"graft.v1.PredictionService.StreamPredict"}


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_app(Settings(), lambda: None).openapi()


@pytest.mark.parametrize("component", sorted(SAME_FIELDS))
def test_every_resource_has_the_field_names_of_its_proto_message(openapi, component):
    http_fields = set(openapi["components"]["schemas"][component]["properties"])
    proto_fields = {field.name for field in SAME_FIELDS[component].fields}
    assert http_fields == proto_fields, (
        f"{component}: HTTP only {http_fields - proto_fields}, proto only {proto_fields - http_fields}"
    )


def test_the_training_spec_carries_every_field_of_the_cores_request():
    renamed = {"dataset_id": "dataset", "head_name": "head"}
    assert {renamed.get(name, name) for name in TrainRequest.model_fields} == {
        f.name for f in pb.TrainingSpec.DESCRIPTOR.fields
    }


def _http_rules() -> dict[str, list[tuple[str, str]]]:
    """Every RPC's full name -> its (method, path) bindings, from the google.api.http options."""
    rules = {}
    for service in api.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            bindings = [rule, *rule.additional_bindings]
            rules[method.full_name] = [
                (b.WhichOneof("pattern"), getattr(b, b.WhichOneof("pattern")))
                for b in bindings
                if b.WhichOneof("pattern")
            ]
    return rules


def _template(path: str) -> str:
    """'/v1/{name=heads/*}/aliases/{alias}' and '/v1/heads/{head}/aliases/{alias}' -> '/v1/heads/*/aliases/*'."""
    path = re.sub(r"\{[a-z_.]+=([^}]+)\}", r"\1", path)
    return re.sub(r"\{[a-z_]+\}", "*", path)


def test_every_rpc_has_its_http_route_and_every_route_its_rpc(openapi):
    rules = _http_rules()
    unbound = sorted(name for name, bindings in rules.items() if not bindings and name not in GRPC_ONLY)
    assert not unbound, f"RPCs without a google.api.http route: {unbound}"
    from_protos = {(verb, _template(path)) for bindings in rules.values() for verb, path in bindings}
    from_openapi = {
        (verb, _template(path))
        for path, operations in openapi["paths"].items()
        if not path.startswith("/v1/admin/")
        for verb in operations
    }
    assert from_protos - from_openapi == set(), "routes the protos declare and HTTP lacks"
    assert from_openapi - from_protos == set(), "HTTP routes no RPC declares"


def test_query_parameters_are_fields_of_the_request_message(openapi):
    for service in api.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            for verb, path in _http_rules()[method.full_name]:
                http_path = next(p for p in openapi["paths"] if _template(p) == _template(path))
                query = {
                    p["name"] for p in openapi["paths"][http_path][verb].get("parameters", []) if p["in"] == "query"
                }
                fields = {f.name for f in method.input_type.fields}
                assert query <= fields, f"{method.full_name}: query parameters {query - fields} are not request fields"
