"""The labelling loop end to end, over HTTP and over gRPC, against a real ``bentoml serve``: upload a pool of
Fashion-MNIST images with two labelled per class, train, ask what to label next, label it (the oracle knows each
image's class), retrain, and the head gets better on test images it never saw."""

from pathlib import Path

import pytest

from client import connect
from client.base import Client
from harness.sample_data import fashion_mnist_pngs
from harness.servers import Server, make_tenant_key, start_server

POOL_PER_CLASS = 20
STARTING_PER_CLASS = 2
ROUNDS, PER_ROUND = 2, 20
TEST_PER_CLASS = 20
CLASSES = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    server = start_server(tmp_path_factory.mktemp("labelling"), GRAFT_AUTH="keys")
    yield server
    server.stop()


def pool_folder(root: Path) -> dict[str, str]:
    """``root`` with STARTING_PER_CLASS images in each class folder and the rest of the pool directly in it,
    unlabelled; file name (as uploaded) -> true label."""
    truth = {}
    seen: dict[str, int] = {}
    for number, (data, label) in enumerate(fashion_mnist_pngs("train", POOL_PER_CLASS, seed=11)):
        seen[label] = seen.get(label, 0) + 1
        relative = f"{label}/{number}.png" if seen[label] <= STARTING_PER_CLASS else f"{number}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
        truth[relative] = label
    return truth


def accuracy_on_unseen_images(graft: Client, head: str) -> float:
    test = fashion_mnist_pngs("test", TEST_PER_CLASS, seed=11)  # the test split: images the pool does not hold
    answers = graft.predict([data for data, _ in test], head)
    return sum(a.heads[0].top[0].label == label for a, (_, label) in zip(answers, test, strict=True)) / len(test)


@pytest.mark.parametrize("door", ["http", "grpc"])
def test_suggested_labels_make_a_retrained_head_better_on_unseen_images(server, tmp_path, door):
    key = make_tenant_key(server, f"labeller-{door}")
    truth = pool_folder(tmp_path)
    url = server.http_url if door == "http" else f"grpc://{server.grpc_target}"
    with connect(url, key) as graft:
        dataset = graft.create_dataset(tmp_path, "garment-pool")
        assert (dataset.labelled_example_count, dataset.unlabelled_example_count) == (
            CLASSES * STARTING_PER_CLASS,
            CLASSES * (POOL_PER_CLASS - STARTING_PER_CLASS),
        )
        job = graft.wait(graft.train(dataset.name, "garments", kind="linear").name)
        assert job.state == "succeeded", job.error
        accuracies = [accuracy_on_unseen_images(graft, "garments")]
        labelled: set[str] = set()
        for round_ in range(1, ROUNDS + 1):
            found = graft.suggest_examples(dataset.name, "garments", count=PER_ROUND)
            assert found.head_version == f"heads/garments/versions/{round_}"
            picked = [s.example for s in found.suggestions]
            assert len(picked) == PER_ROUND and all(e.label is None and e.file_name in truth for e in picked)
            assert not labelled & {e.file_name for e in picked}  # a labelled image is never suggested again
            labelled |= {e.file_name for e in picked}
            graft.label_examples(dataset.name, {str(e.index): truth[e.file_name] for e in picked})
            job = graft.wait(graft.train(dataset.name, "garments", kind="linear").name)
            assert job.state == "succeeded", job.error
            accuracies.append(accuracy_on_unseen_images(graft, "garments"))
        version = graft.get_head_version("garments", ROUNDS + 1)
    assert version.metrics["examples_used"] == CLASSES * STARTING_PER_CLASS + ROUNDS * PER_ROUND
    assert accuracies[-1] > accuracies[0], accuracies
