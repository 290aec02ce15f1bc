"""The head-kind registry (adapters/kinds.py): one record per kind, and everything else agrees with it."""

import dataclasses

import pytest
import torch
from pydantic import ValidationError

from adapters.errors import InvalidInput
from adapters.heads import normalised
from adapters.kinds import KINDS, HeadConfig, HeadKind, HeadKindSpec, build_head, get_kind
from service.grpc import convert
from service.grpc.gen.graft.v1 import resources_pb2 as pb
from service.kind_choice import AUTO_KIND, auto_candidates, kinds_to_try
from service.resources import TrainingKind, TrainingSpec
from service.training import TrainRequest

PROTO_PREFIX = "HEAD_KIND_"
UNKNOWN = "no-such-kind"


def config_of(spec: HeadKindSpec, **fields) -> HeadConfig:
    """The smallest config the record accepts: the fields its kind requires, and no others."""
    shape = {"kind": spec.name, "in_features": 4, "num_classes": 3}
    shape |= {"hidden": 8} if spec.hidden_layer else {}
    shape |= {"tail_blocks": 1, "tail_out_channels": 4} if spec.copies_tail else {}
    return HeadConfig(**(shape | fields))


# --- the lookup -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [UNKNOWN, "auto", "Linear", ""])
def test_an_unknown_kind_is_refused_at_the_lookup_naming_every_known_kind(name):
    with pytest.raises(InvalidInput, match="unknown head kind") as refused:
        get_kind(name)
    assert refused.value.message.endswith(f"the known kinds are {', '.join(KINDS)}")
    assert refused.value.details == {"kind": name, "known": list(KINDS)}


def test_a_kind_is_found_by_its_name_or_its_enum_member():
    for name, spec in KINDS.items():
        assert spec.name == name
        assert get_kind(name) is spec is get_kind(HeadKind(name))


def test_an_unknown_kind_gets_no_defaults_anywhere():
    with pytest.raises(ValidationError) as request:
        TrainRequest(dataset_id="ds", head_name="h", kind=UNKNOWN)
    with pytest.raises(ValidationError) as config:
        HeadConfig(kind=UNKNOWN, in_features=4, num_classes=3)
    for refused in (request, config):
        assert all(f"'{name}'" in str(refused.value) for name in KINDS)


# --- the registry, the service's enums and the protos agree -------------------------------


def test_every_registered_kind_is_a_proto_head_kind_and_every_proto_head_kind_is_registered_or_auto():
    proto = [name.removeprefix(PROTO_PREFIX).lower() for name in pb.HeadKind.keys() if name != "HEAD_KIND_UNSPECIFIED"]
    assert AUTO_KIND not in KINDS, "'auto' is request only: no head is of kind auto"
    assert sorted(proto) == sorted([*KINDS, AUTO_KIND])


def test_the_registry_keeps_the_protos_order():
    numbers = [pb.HeadKind.Value(PROTO_PREFIX + name.upper()) for name in KINDS]
    assert numbers == sorted(numbers)


def test_the_services_enums_are_the_registrys_kinds_and_auto_is_request_only():
    assert [kind.value for kind in HeadKind] == list(KINDS)
    assert [kind.value for kind in TrainingKind] == [*KINDS, AUTO_KIND]
    with pytest.raises(ValueError):
        HeadKind(AUTO_KIND)


@pytest.mark.parametrize("kind", [*KINDS, AUTO_KIND])
def test_every_kind_crosses_the_grpc_door_as_its_proto_value_and_back(kind):
    number = pb.HeadKind.Value(PROTO_PREFIX + kind.upper())
    spec = convert.training_spec(pb.TrainingSpec(dataset="datasets/ds", head="h", kind=number))
    assert spec.kind is TrainingKind(kind)
    assert convert.message(spec, pb.TrainingSpec).kind == number
    assert TrainingSpec.model_validate_json(spec.model_dump_json()).kind.value == kind


# --- what each record says is what the rest does ----------------------------------------------


@pytest.mark.parametrize("spec", KINDS.values(), ids=list(KINDS))
def test_a_requests_defaults_and_search_are_its_kinds_record(spec):
    request = TrainRequest(dataset_id="ds", head_name="h", kind=spec.name)
    assert request.kinds == [HeadKind(spec.name)]
    assert request.hyperparameters(HeadKind(spec.name)) == spec.hyperparams
    assert request.epochs == spec.hyperparams.epochs
    assert request.trials == spec.search_space.trials


@pytest.mark.parametrize("spec", [spec for spec in KINDS.values() if not spec.searched], ids=lambda spec: spec.name)
def test_a_kind_with_nothing_to_search_has_one_trial_and_refuses_a_search(spec):
    assert spec.search_space.trials == 1
    with pytest.raises(ValidationError, match="no hyper-parameters"):
        TrainRequest(dataset_id="ds", head_name="h", kind=spec.name, hyperparams={"epochs": 2})


@pytest.mark.parametrize("spec", KINDS.values(), ids=list(KINDS))
def test_a_head_configs_shape_and_dropout_are_its_kinds_record(spec):
    config = config_of(spec)
    assert config.dropout == (spec.dropout or 0.0)
    with pytest.raises(ValidationError):
        config_of(spec, hidden=None if spec.hidden_layer else 8)
    if spec.dropout is None:
        with pytest.raises(ValidationError, match="no dropout"):
            config_of(spec, dropout=0.1)
    with pytest.raises(InvalidInput, match="tail"):
        build_head(config, None if spec.copies_tail else torch.nn.Identity())


@pytest.mark.parametrize("spec", [spec for spec in KINDS.values() if spec.gather], ids=lambda spec: spec.name)
def test_a_gathered_kind_serves_what_its_module_computes(spec):
    head = build_head(config_of(spec))
    generator = torch.Generator().manual_seed(0)
    head.load_state_dict(
        {name: torch.rand(t.shape, generator=generator) + 0.5 for name, t in head.state_dict().items()}
    )
    x = torch.randn(5, 4, generator=generator)

    weight, bias, centre = spec.gather(head)
    inputs = x if centre is None else normalised(x, centre)
    torch.testing.assert_close(inputs @ weight.T + bias, head(x))


# --- kind 'auto' -------------------------------------------------------------------------


def test_auto_considers_exactly_the_kinds_whose_record_allows_it_cheapest_first():
    ruled = sorted((spec for spec in KINDS.values() if spec.auto), key=lambda spec: spec.auto.rank)
    assert [kind.value for kind in auto_candidates(opt_in=True)] == [spec.name for spec in ruled]
    assert [kind.value for kind in auto_candidates(opt_in=False)] == [s.name for s in ruled if not s.auto.opt_in]
    assert TrainRequest(dataset_id="ds", head_name="h", kind="auto").kinds == auto_candidates(opt_in=False)
    asked = TrainRequest(dataset_id="ds", head_name="h", kind="auto", auto_finetune=True)
    assert asked.kinds == auto_candidates(opt_in=True)


def test_auto_follows_a_changed_record(monkeypatch):
    linear = KINDS["linear"]
    needs_three = dataclasses.replace(linear.auto, min_per_class=3)
    monkeypatch.setitem(KINDS, "linear", dataclasses.replace(linear, auto=needs_three))
    monkeypatch.setitem(KINDS, "mlp", dataclasses.replace(KINDS["mlp"], auto=None))

    tried, left_out = kinds_to_try(False, [2, 5])
    assert [kind.value for kind in tried] == ["prototype"]
    assert [(candidate.kind.value, candidate.status) for candidate in left_out] == [("linear", "skipped")]
    assert left_out[0].note == "linear needs at least 3 training examples of every class; the smallest class has 2"


def test_auto_leaves_out_a_kind_whose_smallest_class_is_below_its_minimum_and_says_why():
    needy = {spec.name: spec.auto.min_per_class for spec in KINDS.values() if spec.auto and spec.auto.min_per_class > 1}
    assert needy, "finetune needs a minimum of training examples per class"
    smallest = min(needy.values()) - 1

    tried, left_out = kinds_to_try(True, [smallest, 100])
    assert {candidate.kind.value for candidate in left_out} == set(needy)
    assert all(c.status == "skipped" and c.note.endswith(f"the smallest class has {smallest}") for c in left_out)
    assert tried == [kind for kind in auto_candidates(opt_in=True) if kind.value not in needy]
