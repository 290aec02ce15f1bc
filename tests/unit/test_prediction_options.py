"""The prediction options are one model (service/prediction_options.py): the protos, the client's copy, the OpenAPI
document of both prediction routes and the gRPC door's reading of a message must all say what it says."""

from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from pydantic import ValidationError

from client import models as client_models
from service.config import Settings
from service.grpc import convert
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.http import predict
from service.http.app import create_app
from service.prediction_options import PredictOptions

NOT_OPTIONS = {"images", "heads", "request_id", "image"}  # what a request predicts, not how
PROTO_TYPES = {FieldDescriptor.TYPE_INT32: int, FieldDescriptor.TYPE_BOOL: bool, FieldDescriptor.TYPE_DOUBLE: float}


def _python_type(annotation: Any) -> type:
    """``float | None`` -> float: proto3 scalars have no null (zero stands for unset)."""
    return next(t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None))


@pytest.mark.parametrize("message", [api.PredictRequest.DESCRIPTOR, api.StreamPredictRequest.DESCRIPTOR])
def test_both_predict_messages_carry_exactly_the_models_options_with_matching_types(message: Descriptor):
    in_proto = {field.name: PROTO_TYPES.get(field.type) for field in message.fields if field.name not in NOT_OPTIONS}
    in_model = {name: _python_type(field.annotation) for name, field in PredictOptions.model_fields.items()}
    assert in_proto == in_model


def test_the_clients_copy_has_the_servers_names_types_defaults_bounds_and_descriptions():
    client = client_models.PredictOptions.model_json_schema()
    assert client["properties"] == PredictOptions.model_json_schema()["properties"]
    assert client.get("required") is None  # every option may be left out


def _request_properties(openapi: dict, schema: dict) -> dict:
    """A request body's properties, following $ref and allOf (a form model is documented as allOf its model)."""
    if "$ref" in schema:
        return _request_properties(openapi, openapi["components"]["schemas"][schema["$ref"].split("/")[-1]])
    properties = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        properties |= _request_properties(openapi, part)
    return properties


def _stated(schema: dict, *, form: bool = False) -> dict:
    """A property's schema as OpenAPI states it: FastAPI leaves a null default out, and a form field, which
    cannot be null, is stated as its non-null branch."""
    stated = {key: value for key, value in schema.items() if not (key == "default" and value is None)}
    if form and "anyOf" in stated:
        stated |= next(branch for branch in stated.pop("anyOf") if branch.get("type") != "null")
    return stated


def test_both_prediction_routes_document_every_option_with_the_models_bounds():
    openapi = create_app(Settings(), lambda: None).openapi()
    properties = PredictOptions.model_json_schema()["properties"]
    encodings = set()
    for route in predict.router.routes:
        [(encoding, body)] = openapi["paths"][route.path]["post"]["requestBody"]["content"].items()
        encodings.add(encoding)
        model = {name: _stated(schema, form=encoding != "application/json") for name, schema in properties.items()}
        documented = _request_properties(openapi, body["schema"])
        assert {name: documented.get(name) for name in model} == model, f"{encoding} at {route.path}"
    assert encodings == {"application/json", "multipart/form-data"}


def test_a_predict_message_at_proto3_zero_values_asks_for_the_defaults():
    assert convert.predict_options(api.PredictRequest()) == PredictOptions()
    assert convert.predict_options(api.StreamPredictRequest(top_k=0, coverage=0.0)) == PredictOptions()
    given = {"top_k": 3, "include_embedding": True, "min_score": 0.5, "coverage": 0.9}
    assert convert.predict_options(api.StreamPredictRequest(**given)) == PredictOptions(**given)


@pytest.mark.parametrize("given", [{"top_k": -1}, {"top_k": 1001}, {"min_score": 1.5}, {"coverage": 1.0}])
def test_a_predict_message_out_of_bounds_is_refused_by_the_model(given):
    with pytest.raises(ValidationError, match=next(iter(given))):
        convert.predict_options(api.PredictRequest(**given))
