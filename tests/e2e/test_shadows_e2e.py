"""Shadow versions, one combined comparison, feedback and live accuracy, on two replicas on PostgreSQL (issue 25).

Two ``bentoml serve`` replicas share a real PostgreSQL registry behind nginx (harness/cluster.py), as in
test_replicas_e2e.py. A head ``fm`` gets two small Fashion-MNIST versions (a prototype and a linear head); its
alias ``prod`` serves version 1 and version 2 is its shadow. Predictions go to each replica's own ports (both
doors) and through nginx, so both replicas surely counted some; ``:compare`` read once through nginx is their
sum. True labels reported to the replica that did not answer give live accuracy; last, ``prod`` moves to 2 under
load on both doors. Each replica adds what it observed to the registry every GRAFT_MONITOR_FLUSH_S (short here).
The tests run in file order and share the predictions of the module's fixture.
"""

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from harness.cluster import Cluster, start_cluster
from harness.sample_data import FASHION_MNIST_CLASSES, fashion_mnist_pngs
from harness.servers import make_tenant_key, wait_for_job
from service.grpc.gen.graft.v1 import service_pb2 as api
from service.grpc.gen.graft.v1 import service_pb2_grpc as rpc

HEAD = "fm"
PROD = f"{HEAD}:prod"
FLUSH_S = 0.5  # GRAFT_MONITOR_FLUSH_S: the combined count appears within moments
TIMEOUT_S = 120


@dataclass(frozen=True)
class Answer:
    """One image predicted with ``include_shadow``: what the served version and its shadow said of it."""

    prediction_id: str
    true_label: str
    version: int
    label: str
    score: float
    shadow_version: int
    shadow_label: str
    shadow_score: float
    replica: int | None  # the replica asked directly; None: through nginx
    door: str


@dataclass
class Shadowed:
    """The module's shared state: both tenants' keys and every answer predicted with the shadow set."""

    key: str
    other_key: str
    answers: list[Answer]

    @property
    def reported(self) -> list[Answer]:
        """The answers whose true labels the feedback test reports."""
        return self.answers[:-2]

    @property
    def held_back(self) -> list[Answer]:
        """The answers left without feedback, for the isolation test."""
        return self.answers[-2:]


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def http_client(base_url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("shadows"), GRAFT_MONITOR_FLUSH_S=str(FLUSH_S))
    yield cluster
    cluster.stop()


def upload_fashion_mnist(client: httpx.Client, per_class: int) -> str:
    examples = fashion_mnist_pngs("train", per_class=per_class)
    files = [("files", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(examples)]
    response = client.post(
        "/v1/datasets", data={"display_name": "fashion", "labels": [label for _, label in examples]}, files=files
    )
    assert response.status_code == 201, response.text
    return response.json()["name"]


def train(client: httpx.Client, spec: dict) -> int:
    response = client.post("/v1/jobs", json={"head": HEAD, **spec})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["name"])
    assert job["state"] == "succeeded", job
    return client.get(f"/v1/heads/{HEAD}").json()["latest_version"]


def predict_http(base_url: str, key: str, images: list[tuple[bytes, str]], replica: int | None) -> list[Answer]:
    body = {"images": [base64.b64encode(data).decode() for data, _ in images], "heads": [PROD], "include_shadow": True}
    with http_client(base_url, key) as client:
        response = client.post("/v1/predict", json=body)
    assert response.status_code == 200, response.text
    answers = []
    for (_, true_label), image in zip(images, response.json()["predictions"], strict=True):
        [head] = image["heads"]
        shadow = head["shadow"]
        assert shadow is not None, head
        answers.append(
            Answer(
                image["prediction_id"],
                true_label,
                head["version"],
                head["top"][0]["label"],
                head["top"][0]["score"],
                shadow["version"],
                shadow["top"][0]["label"],
                shadow["top"][0]["score"],
                replica,
                "http",
            )
        )
    return answers


def predict_grpc(target: str, key: str, images: list[tuple[bytes, str]], replica: int | None) -> list[Answer]:
    request = api.PredictRequest(images=[data for data, _ in images], heads=[PROD], include_shadow=True)
    with grpc.insecure_channel(target) as channel:
        response = rpc.PredictionServiceStub(channel).Predict(request, metadata=auth(key), timeout=TIMEOUT_S)
    answers = []
    for (_, true_label), image in zip(images, response.predictions, strict=True):
        [head] = image.heads
        assert head.HasField("shadow"), head
        answers.append(
            Answer(
                image.prediction_id,
                true_label,
                head.version,
                head.top[0].label,
                head.top[0].score,
                head.shadow.version,
                head.shadow.top[0].label,
                head.shadow.top[0].score,
                replica,
                "grpc",
            )
        )
    return answers


@pytest.fixture(scope="module")
def shadowed(cluster: Cluster) -> Shadowed:
    """Tenants acme and globex; acme's head ``fm`` with versions 1 (prototype) and 2 (linear), ``prod`` on 1, the
    shadow set to 2 over gRPC, and test images predicted on both doors of each replica and of nginx."""
    key, other_key = make_tenant_key(cluster.replicas[0], "acme"), make_tenant_key(cluster.replicas[0], "globex")
    with http_client(cluster.http_url, key) as client:
        dataset = upload_fashion_mnist(client, per_class=10)
        assert train(client, {"dataset": dataset, "kind": "prototype"}) == 1
        linear = {"dataset": dataset, "kind": "linear", "search": {"lr": [1.0], "weight_decay": [0.01]}}
        assert train(client, linear) == 2
        assert client.put(f"/v1/heads/{HEAD}/aliases/prod", json={"version": 1}).status_code == 200

    with grpc.insecure_channel(cluster.grpc_target) as channel:
        head = rpc.HeadServiceStub(channel).SetHeadShadow(
            api.SetHeadShadowRequest(name=f"heads/{HEAD}", version=2), metadata=auth(key), timeout=TIMEOUT_S
        )
    assert head.HasField("shadow_version") and head.shadow_version == 2
    for replica in cluster.replicas:  # in the registry: both replicas see it at once
        with http_client(replica.http_url, key) as direct:
            assert direct.get(f"/v1/heads/{HEAD}").json()["shadow_version"] == 2

    images = fashion_mnist_pngs("test", per_class=3)  # 30 images the heads never saw
    first, second = cluster.replicas
    answers = [
        *predict_http(first.http_url, key, images[0:6], replica=0),
        *predict_grpc(second.grpc_target, key, images[6:12], replica=1),
        *predict_grpc(first.grpc_target, key, images[12:17], replica=0),
        *predict_http(second.http_url, key, images[17:22], replica=1),
        *predict_http(cluster.http_url, key, images[22:26], replica=None),
        *predict_grpc(cluster.grpc_target, key, images[26:30], replica=None),
    ]
    return Shadowed(key, other_key, answers)


def combined_comparison(cluster: Cluster, key: str, expected: int) -> dict:
    """``:compare`` read through nginx once the replicas' periodic flushes have brought ``expected`` images in
    (a read flushes only the replica nginx picks; the other's counts arrive within GRAFT_MONITOR_FLUSH_S)."""
    deadline = time.monotonic() + 30
    with http_client(cluster.http_url, key) as client:
        while True:
            response = client.get(f"/v1/heads/{HEAD}:compare")
            assert response.status_code == 200, response.text
            comparisons = response.json()["comparisons"]
            if (comparisons and comparisons[0]["compared"] >= expected) or time.monotonic() > deadline:
                return response.json()
            time.sleep(FLUSH_S / 2)


def each_replicas_comparison(cluster: Cluster, key: str) -> list[dict]:
    """``:compare`` read on each replica directly (each read flushes that replica's pending observations)."""
    out = []
    for replica in cluster.replicas:
        with http_client(replica.http_url, key) as direct:
            response = direct.get(f"/v1/heads/{HEAD}:compare")
            assert response.status_code == 200, response.text
            out.append(response.json())
    return out


def everything_flushed(cluster: Cluster, shadowed: Shadowed) -> None:
    """Wait until the predictions are all counted, then read on each replica so that both replicas' prediction
    records are surely in the registry (a flush writes them right after the counts): feedback then finds any id."""
    combined_comparison(cluster, shadowed.key, len(shadowed.answers))
    each_replicas_comparison(cluster, shadowed.key)


def test_predictions_on_both_replicas_with_a_shadow_set_over_grpc_add_up_to_one_comparison(
    cluster: Cluster, shadowed: Shadowed
) -> None:
    answers = shadowed.answers
    assert {a.replica for a in answers} == {0, 1, None} and {a.door for a in answers} == {"http", "grpc"}
    assert {(a.version, a.shadow_version) for a in answers} == {(1, 2)}  # prod serves 1, the shadow is 2
    ids = [a.prediction_id for a in answers]
    assert len(set(ids)) == len(answers) and all(0 < len(i) <= 64 for i in ids)

    figures = combined_comparison(cluster, shadowed.key, len(answers))  # one read, through nginx
    assert figures["head"] == HEAD
    [comparison] = figures["comparisons"]
    assert (comparison["served_version"], comparison["shadow_version"]) == (1, 2)
    assert comparison["compared"] == len(answers)  # every image of both replicas, once

    agreed = sum(a.label == a.shadow_label for a in answers)
    assert comparison["agreement"] == pytest.approx(agreed / len(answers))
    mean_difference = sum(a.shadow_score - a.score for a in answers) / len(answers)
    assert comparison["mean_top_score_difference"] == pytest.approx(mean_difference, abs=1e-5)
    labels = comparison["labels"]
    assert set(FASHION_MNIST_CLASSES) <= set(labels)
    cells = Counter((a.label, a.shadow_label) for a in answers)
    expected = [[cells[(served, shadow)] for shadow in labels] for served in labels]
    assert comparison["confusion"] == expected
    assert sum(comparison["confusion"][i][i] for i in range(len(labels))) == agreed
    assert (comparison["labelled"], comparison["served_accuracy"], comparison["shadow_accuracy"]) == (0, None, None)

    for direct in each_replicas_comparison(cluster, shadowed.key):  # every replica reads the same combined figures
        assert direct["comparisons"] == figures["comparisons"]
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        over_grpc = rpc.HeadServiceStub(channel).CompareHeadVersions(
            api.CompareHeadVersionsRequest(name=f"heads/{HEAD}"), metadata=auth(shadowed.key), timeout=TIMEOUT_S
        )
    [same] = over_grpc.comparisons
    assert (same.served_version, same.shadow_version, same.compared) == (1, 2, len(answers))
    assert same.agreement == pytest.approx(comparison["agreement"])
    assert [list(row.counts) for row in same.confusion] == expected
    assert same.labelled == 0 and not same.HasField("served_accuracy")


def feedback_http(base_url: str, key: str, prediction_id: str, label: str) -> httpx.Response:
    with http_client(base_url, key) as client:
        return client.post(f"/v1/predictions/{prediction_id}:feedback", json={"label": label})


def feedback_grpc(target: str, key: str, prediction_id: str, label: str) -> api.PredictionFeedback:
    with grpc.insecure_channel(target) as channel:
        return rpc.PredictionServiceStub(channel).ReportPredictionFeedback(
            api.ReportPredictionFeedbackRequest(name=f"predictions/{prediction_id}", label=label),
            metadata=auth(key),
            timeout=TIMEOUT_S,
        )


def grpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_true_labels_reported_over_both_doors_to_either_replica_give_both_versions_live_accuracy(
    cluster: Cluster, shadowed: Shadowed
) -> None:
    answers, reported = shadowed.answers, shadowed.reported
    everything_flushed(cluster, shadowed)
    first, second = cluster.replicas
    for i, answer in enumerate(reported):
        # an id answered by one replica is reported to the other; nginx's go back through nginx; doors alternate
        http_url, grpc_target = {
            0: (second.http_url, second.grpc_target),
            1: (first.http_url, first.grpc_target),
            None: (cluster.http_url, cluster.grpc_target),
        }[answer.replica]
        if i % 2 == 0:
            response = feedback_http(http_url, shadowed.key, answer.prediction_id, answer.true_label)
            assert response.status_code == 200, response.text
            feedback = response.json()
            [verdict] = feedback["heads"]
            got = (verdict["head"], verdict["version"], verdict["correct"])
            got_shadow = (verdict["shadow_version"], verdict["shadow_correct"])
        else:
            message = feedback_grpc(grpc_target, shadowed.key, answer.prediction_id, answer.true_label)
            feedback = {"prediction_id": message.prediction_id, "label": message.label}
            [verdict_pb] = message.heads
            got = (verdict_pb.head, verdict_pb.version, verdict_pb.correct)
            got_shadow = (verdict_pb.shadow_version, verdict_pb.shadow_correct)
        assert (feedback["prediction_id"], feedback["label"]) == (answer.prediction_id, answer.true_label)
        assert got == (HEAD, 1, answer.label == answer.true_label)
        assert got_shadow == (2, answer.shadow_label == answer.true_label)

    again = feedback_http(cluster.http_url, shadowed.key, reported[0].prediction_id, reported[0].true_label)
    assert again.status_code == 409, again.text  # once per prediction
    error = grpc_error(lambda: feedback_grpc(cluster.grpc_target, shadowed.key, reported[1].prediction_id, "bag"))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    no_class = feedback_http(cluster.http_url, shadowed.key, shadowed.held_back[0].prediction_id, "zebra")
    assert no_class.status_code == 400 and "not a class" in no_class.json()["message"], no_class.text

    [comparison] = combined_comparison(cluster, shadowed.key, len(answers))["comparisons"]
    assert comparison["compared"] == len(answers)
    assert comparison["labelled"] == len(reported)
    served_right = sum(a.label == a.true_label for a in reported)
    shadow_right = sum(a.shadow_label == a.true_label for a in reported)
    assert comparison["served_accuracy"] == pytest.approx(served_right / len(reported))
    assert comparison["shadow_accuracy"] == pytest.approx(shadow_right / len(reported))
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        [same] = (
            rpc.HeadServiceStub(channel)
            .CompareHeadVersions(
                api.CompareHeadVersionsRequest(name=f"heads/{HEAD}"), metadata=auth(shadowed.key), timeout=TIMEOUT_S
            )
            .comparisons
        )
    assert same.labelled == len(reported)
    assert same.served_accuracy == pytest.approx(served_right / len(reported))
    assert same.shadow_accuracy == pytest.approx(shadow_right / len(reported))


def test_another_tenant_can_neither_read_the_comparison_nor_set_the_shadow_nor_report_on_its_predictions(
    cluster: Cluster, shadowed: Shadowed
) -> None:
    everything_flushed(cluster, shadowed)
    theirs = shadowed.held_back[-1]
    with http_client(cluster.http_url, shadowed.other_key) as other:
        assert other.get(f"/v1/heads/{HEAD}:compare").status_code == 404
        assert other.put(f"/v1/heads/{HEAD}:shadow", json={"version": 1}).status_code == 404
        assert other.delete(f"/v1/heads/{HEAD}:shadow").status_code == 404
    unknown_id = "x" * len(theirs.prediction_id)
    not_theirs = feedback_http(cluster.http_url, shadowed.other_key, theirs.prediction_id, theirs.true_label)
    unknown = feedback_http(cluster.http_url, shadowed.key, unknown_id, theirs.true_label)
    assert (not_theirs.status_code, unknown.status_code) == (404, 404), (not_theirs.text, unknown.text)
    # the same answer as for an id that never existed: nothing tells another tenant's ids apart
    assert not_theirs.json()["message"].replace(theirs.prediction_id, "ID") == unknown.json()["message"].replace(
        unknown_id, "ID"
    )

    with grpc.insecure_channel(cluster.grpc_target) as channel:
        heads, predictions = rpc.HeadServiceStub(channel), rpc.PredictionServiceStub(channel)
        other = auth(shadowed.other_key)
        calls = [
            lambda: heads.CompareHeadVersions(api.CompareHeadVersionsRequest(name=f"heads/{HEAD}"), metadata=other),
            lambda: heads.SetHeadShadow(api.SetHeadShadowRequest(name=f"heads/{HEAD}", version=1), metadata=other),
            lambda: heads.ClearHeadShadow(api.ClearHeadShadowRequest(name=f"heads/{HEAD}"), metadata=other),
            lambda: predictions.ReportPredictionFeedback(
                api.ReportPredictionFeedbackRequest(name=f"predictions/{theirs.prediction_id}", label="bag"),
                metadata=other,
            ),
            lambda: predictions.ReportPredictionFeedback(
                api.ReportPredictionFeedbackRequest(name=f"predictions/{unknown_id}", label="bag"),
                metadata=auth(shadowed.key),
            ),
        ]
        for call in calls:
            assert grpc_error(call).code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]

    with http_client(cluster.http_url, shadowed.key) as owner:  # nothing of acme's changed
        assert owner.get(f"/v1/heads/{HEAD}").json()["shadow_version"] == 2
    mine = feedback_http(cluster.http_url, shadowed.key, theirs.prediction_id, theirs.true_label)
    assert mine.status_code == 200, mine.text  # the other tenant's tries used nothing up


@dataclass(frozen=True)
class Outcome:
    door: str
    started: float  # time.monotonic()
    finished: float
    version: int | None  # the version that answered; None: the request failed
    error: str | None


async def versioned_predictions(
    http_url: str, grpc_target: str, key: str, image: bytes, ref: str, concurrency: int, stop: asyncio.Event
) -> list[Outcome]:
    """Predict ``ref`` through the load balancer until ``stop``, half HTTP and half gRPC, with no retry: each
    request's outcome with the version that answered it."""
    outcomes: list[Outcome] = []
    body = {"images": [base64.b64encode(image).decode()], "heads": [ref]}

    async def http_worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await client.post("/v1/predict", json=body)
            except httpx.TransportError as exc:
                outcomes.append(Outcome("http", started, time.monotonic(), None, repr(exc)))
                continue
            if response.status_code == 200:
                version = response.json()["predictions"][0]["heads"][0]["version"]
                outcomes.append(Outcome("http", started, time.monotonic(), version, None))
            else:
                error = f"http {response.status_code}: {response.text[:200]}"
                outcomes.append(Outcome("http", started, time.monotonic(), None, error))

    async def grpc_worker(stub: rpc.PredictionServiceStub) -> None:
        request = api.PredictRequest(images=[image], heads=[ref])
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = await stub.Predict(request, metadata=auth(key), timeout=60)
            except grpc.aio.AioRpcError as exc:
                error = f"grpc {exc.code().name}: {exc.details()}"
                outcomes.append(Outcome("grpc", started, time.monotonic(), None, error))
                continue
            outcomes.append(Outcome("grpc", started, time.monotonic(), response.predictions[0].heads[0].version, None))

    async with (
        httpx.AsyncClient(base_url=http_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client,
        grpc.aio.insecure_channel(grpc_target) as channel,
    ):
        stub = rpc.PredictionServiceStub(channel)
        await asyncio.gather(*(http_worker(client) if i % 2 == 0 else grpc_worker(stub) for i in range(concurrency)))
    return outcomes


def test_moving_the_alias_under_load_on_both_doors_fails_no_request_and_answers_switch_to_the_new_version(
    cluster: Cluster, shadowed: Shadowed
) -> None:
    image, _ = fashion_mnist_pngs("test", per_class=1, seed=1)[0]

    async def run() -> tuple[list[Outcome], float, float]:
        stop = asyncio.Event()
        load = asyncio.create_task(
            versioned_predictions(cluster.http_url, cluster.grpc_target, shadowed.key, image, PROD, 4, stop)
        )
        await asyncio.sleep(2)
        async with httpx.AsyncClient(
            base_url=cluster.http_url, headers={"Authorization": f"Bearer {shadowed.key}"}, timeout=60
        ) as client:
            sent = time.monotonic()
            moved = await client.put(f"/v1/heads/{HEAD}/aliases/prod", json={"version": 2})
            done = time.monotonic()
        assert moved.status_code == 200, moved.text
        await asyncio.sleep(2.5)
        stop.set()
        return await load, sent, done

    outcomes, sent, done = asyncio.run(run())
    failed = [o.error for o in outcomes if o.error is not None]
    assert failed == [], failed[:10]
    before = [o for o in outcomes if o.finished < sent]
    after = [o for o in outcomes if o.started > done]
    assert {o.door for o in before} == {o.door for o in after} == {"http", "grpc"}, Counter(
        (o.door, o.version) for o in outcomes
    )
    assert {o.version for o in before} == {1}  # answered before the move: the old version
    assert {o.version for o in after} == {2}  # asked once it was moved: the new one, from either replica
    assert len(after) >= 4

    with http_client(cluster.http_url, shadowed.key) as client:  # served by its own shadow now: none to compare
        answer = client.post(
            "/v1/predict", json={"images": [base64.b64encode(image).decode()], "heads": [PROD], "include_shadow": True}
        ).json()
    [head] = answer["predictions"][0]["heads"]
    assert (head["version"], head["shadow"]) == (2, None)
