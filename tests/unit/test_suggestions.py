"""What to label next (SuggestExamples): a dataset's unlabelled Fashion-MNIST images ranked for a real head version,
through the core, both doors, both clients and the CLI."""

import asyncio
import threading

import grpc
import httpx
import pytest

from adapters.search_space import SearchSpace
from client import cli
from harness.inprocess import client_of, serve_http
from harness.sample_data import fashion_mnist_pngs
from service.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc
from service.grpc.server import start_grpc_server
from service.http.app import create_app
from service.runtime import Runtime
from service.suggestions import ExampleSuggester, SuggestRequest
from service.training import TrainRequest

TENANT = "acme"
CLASSES = ("trouser", "bag", "sneaker")
LABELLED_PER_CLASS = 4
ONE_TRIAL = SearchSpace(lr=[1.0], weight_decay=[1e-3])


@pytest.fixture(scope="module")
def images() -> list[tuple[bytes, str]]:
    """Twelve real images of each of three classes."""
    return [(data, label) for data, label in fashion_mnist_pngs("train", per_class=12, seed=7) if label in CLASSES]


def pool_upload(images: list[tuple[bytes, str]]) -> tuple[list[tuple[str, bytes, str | None]], dict[str, str]]:
    """The first LABELLED_PER_CLASS images of each class labelled, the rest unlabelled; file name -> true label."""
    seen: dict[str, int] = {}
    examples: list[tuple[str, bytes, str | None]] = []
    truth = {}
    for i, (data, label) in enumerate(images):
        seen[label] = seen.get(label, 0) + 1
        name = f"shots/{i}.png"
        examples.append((name, data, label if seen[label] <= LABELLED_PER_CLASS else None))
        truth[name] = label
    return examples, truth


@pytest.fixture(scope="module")
def runtime(make_core, tmp_path_factory) -> Runtime:
    runtime = Runtime.around(make_core(tmp_path_factory.mktemp("suggest")))
    runtime.core.settings.auth = "keys"
    for tenant in (TENANT, "globex"):
        runtime.tenants.create_tenant(tenant)
    return runtime


@pytest.fixture(scope="module")
def keys(runtime) -> dict[str, str]:
    return {tenant: runtime.tenants.create_key(tenant).secret for tenant in (TENANT, "globex")}


@pytest.fixture(scope="module")
def pool(runtime, images) -> tuple[str, dict[str, str]]:
    """A partly labelled dataset of acme's and a linear head trained on its labelled part: (dataset id, truth)."""
    examples, truth = pool_upload(images)
    dataset = runtime.core.datasets.create(TENANT, "garments", examples)
    runtime.core.trainer.train(
        TENANT, TrainRequest(dataset_id=dataset.id, head_name="garments", kind="linear", search_space=ONE_TRIAL)
    )
    return dataset.id, truth


def suggest(runtime, dataset_id: str, tenant: str = TENANT, **fields):
    return runtime.core.suggester.suggest(tenant, SuggestRequest(dataset_id=dataset_id, head="garments", **fields))


# -- the core ---------------------------------------------------------------------------------------------------------


def test_suggestions_are_distinct_unlabelled_examples_with_names_reasons_and_the_heads_likeliest_labels(runtime, pool):
    dataset_id, truth = pool
    found = suggest(runtime, dataset_id, count=5)
    unlabelled = {e.index for e in runtime.core.datasets.unlabelled_examples(TENANT, dataset_id)}
    assert found.pool_size == len(unlabelled) == len(truth) - LABELLED_PER_CLASS * len(CLASSES)
    assert found.labelled_size == LABELLED_PER_CLASS * len(CLASSES)
    assert found.head.name == "garments" and found.head.version == 1 and found.strategy.value == "diverse_margin"
    picked = [s.example for s in found.suggestions]
    assert len(picked) == 5 and len({e.index for e in picked}) == 5
    assert all(e.index in unlabelled and e.label is None and e.file_name in truth for e in picked)
    for s in found.suggestions:
        assert s.suggestion.reason.startswith("margin ")
        (first, p1), (second, p2) = s.likeliest
        assert {first, second} <= set(CLASSES) and p1 >= p2
        assert s.suggestion.margin == pytest.approx(p1 - p2, abs=1e-5)


def test_the_same_seed_gives_the_same_suggestions_and_every_strategy_answers(runtime, pool):
    dataset_id, _ = pool
    first = [s.example.index for s in suggest(runtime, dataset_id, count=4, seed=3).suggestions]
    assert [s.example.index for s in suggest(runtime, dataset_id, count=4, seed=3).suggestions] == first
    margins = suggest(runtime, dataset_id, count=4, strategy="margin").suggestions
    assert [s.suggestion.margin for s in margins] == sorted(s.suggestion.margin for s in margins)
    assert len(suggest(runtime, dataset_id, count=4, strategy="random").suggestions) == 4


def test_asking_for_more_than_the_pool_holds_returns_the_whole_pool(runtime, pool):
    dataset_id, truth = pool
    found = suggest(runtime, dataset_id, count=200, strategy="margin")
    assert 0 < len(found.suggestions) <= found.pool_size


def test_a_dataset_without_unlabelled_images_another_tenants_and_unknown_heads_are_refused(runtime, images, pool):
    dataset_id, _ = pool
    labelled = runtime.core.datasets.create(
        TENANT, "all-labelled", [(f"{i}.png", d, lbl) for i, (d, lbl) in enumerate(images)]
    )
    with pytest.raises(FailedPrecondition, match="no unlabelled images"):
        suggest(runtime, labelled.id)
    with pytest.raises(NotFound, match="dataset"):
        suggest(runtime, dataset_id, tenant="globex")
    with pytest.raises(NotFound):
        runtime.core.suggester.suggest(TENANT, SuggestRequest(dataset_id=dataset_id, head="nothing"))
    with pytest.raises(InvalidArgument, match="ImageNet"):
        runtime.core.suggester.suggest(TENANT, SuggestRequest(dataset_id=dataset_id, head="imagenet@mobilenet_v2"))


# -- the doors --------------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_suggests_to_the_owner_refuses_bad_arguments_and_serves_the_images(runtime, keys, images, pool):
    dataset_id, truth = pool
    transport = httpx.ASGITransport(app=create_app(runtime.settings, lambda: runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://graft") as client:

        async def get(path: str, tenant: str = TENANT, **params) -> httpx.Response:
            return await client.get(path, params=params, headers={"Authorization": f"Bearer {keys[tenant]}"})

        mine = await get(f"/v1/datasets/{dataset_id}:suggest", head="garments", count=3, seed=1)
        theirs = await get(f"/v1/datasets/{dataset_id}:suggest", "globex", head="garments")
        refused = {
            case: await get(f"/v1/datasets/{dataset_id}:suggest", **params)
            for case, params in {
                "no head": {},
                "count": {"head": "garments", "count": 201},
                "strategy": {"head": "garments", "strategy": "entropy"},
                "head": {"head": "missing"},
            }.items()
        }
        first = mine.json()["suggestions"][0]["example"]
        image = await get(f"/v1/{first['name']}:image")
        their_image = await get(f"/v1/{first['name']}:image", "globex")
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["dataset"] == f"datasets/{dataset_id}" and body["head_version"] == "heads/garments/versions/1"
    assert body["strategy"] == "diverse_margin" and len(body["suggestions"]) == 3
    assert first["label"] is None and first["file_name"] in truth
    assert [s["example"]["index"] for s in body["suggestions"]] == [
        s.example.index for s in suggest(runtime, dataset_id, count=3, seed=1).suggestions
    ]
    assert theirs.status_code == 404 and their_image.status_code == 404
    assert {case: r.status_code for case, r in refused.items()} == {
        "no head": 422,
        "count": 422,
        "strategy": 422,
        "head": 404,
    }
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == images[first["index"]][0]


@pytest.mark.anyio
async def test_grpc_suggests_to_the_owner_and_refuses_others_and_unknown_strategies(runtime, keys, images, pool):
    dataset_id, _ = pool
    server = await start_grpc_server(runtime, 0, host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = rpc.DatasetServiceStub(channel)

            def auth(tenant: str = TENANT) -> list[tuple[str, str]]:
                return [("authorization", f"Bearer {keys[tenant]}")]

            found = await stub.SuggestExamples(
                api.SuggestExamplesRequest(name=f"datasets/{dataset_id}", head="garments", count=3, seed=1),
                metadata=auth(),
            )
            image = await stub.GetExampleImage(
                api.GetExampleImageRequest(name=found.suggestions[0].example.name), metadata=auth()
            )
            refused = {}
            for case, tenant, fields in [
                ("theirs", "globex", {}),
                ("strategy", TENANT, {"strategy": 99}),
                ("count", TENANT, {"count": 500}),
            ]:
                request = api.SuggestExamplesRequest(name=f"datasets/{dataset_id}", head="garments", **fields)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.SuggestExamples(request, metadata=auth(tenant))
                refused[case] = error.value.code()
    finally:
        await server.stop(grace=1)
    assert (
        found.strategy == api.SUGGESTION_STRATEGY_DIVERSE_MARGIN and found.head_version == "heads/garments/versions/1"
    )
    assert [s.example.index for s in found.suggestions] == [
        s.example.index for s in suggest(runtime, dataset_id, count=3, seed=1).suggestions
    ]
    assert image.content_type == "image/png" and image.data == images[found.suggestions[0].example.index][0]
    assert refused == {
        "theirs": grpc.StatusCode.NOT_FOUND,
        "strategy": grpc.StatusCode.INVALID_ARGUMENT,
        "count": grpc.StatusCode.INVALID_ARGUMENT,
    }


@pytest.mark.anyio
@pytest.mark.parametrize("door", ["http", "grpc"])
async def test_both_clients_read_suggestions_of_unlabelled_examples(runtime, keys, pool, door):
    dataset_id, truth = pool

    def ask(client) -> list:
        return client.suggest_examples(dataset_id, "garments", count=2, strategy="margin").suggestions

    async with client_of(runtime, keys[TENANT], door) as client:
        found = await asyncio.to_thread(ask, client)
    assert len(found) == 2 and all(s.example.label is None and s.example.file_name in truth for s in found)
    assert all(len(s.likeliest) == 2 and s.reason for s in found)


@pytest.mark.anyio
async def test_graft_suggest_prints_the_files_to_label_first(runtime, keys, pool, monkeypatch, capsys):
    dataset_id, truth = pool
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", keys[TENANT])
    with serve_http(runtime) as port:
        argv = ["--url", f"http://127.0.0.1:{port}", "suggest", dataset_id, "--head", "garments", "--count", "3"]
        assert await asyncio.to_thread(cli.main, argv) == 0
    printed = capsys.readouterr().out.splitlines()
    header = next(i for i, row in enumerate(printed) if row.startswith("file"))
    rows = printed[header + 1 :]
    assert len(rows) == 3 and all(row.split()[0] in truth for row in rows)


def test_a_suggestion_needs_a_free_audit_slot_and_stops_at_the_time_limit(runtime, pool):
    dataset_id, _ = pool
    request = SuggestRequest(dataset_id=dataset_id, head="garments", count=3)
    busy = threading.Semaphore(0)
    with pytest.raises(ResourceExhausted, match="GRAFT_MAX_CONCURRENT_AUDITS"):
        runtime.core.suggester.suggest(TENANT, request, slots=busy)
    free = threading.Semaphore(1)
    hasty = ExampleSuggester(
        runtime.core.datasets, runtime.core.heads, runtime.core.extractor, runtime.core.backbones, max_seconds=0.0
    )
    with pytest.raises(DeadlineExceeded, match="GRAFT_MAX_AUDIT_SECONDS"):
        hasty.suggest(TENANT, request, slots=free)
    assert free.acquire(blocking=False)  # the slot was given back


def test_set_size_ranks_by_the_heads_conformal_sets(runtime, pool):
    dataset_id, _ = pool
    found = suggest(runtime, dataset_id, count=4, strategy="set_size")
    sizes = [int(s.suggestion.score) for s in found.suggestions]
    assert len(sizes) == 4 and sizes == sorted(sizes, reverse=True) and sizes[0] >= 1
    assert all(s.suggestion.reason.endswith(f"holds {n} labels") for s, n in zip(found.suggestions, sizes, strict=True))
