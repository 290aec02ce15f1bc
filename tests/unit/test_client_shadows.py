"""The client and the `graft` command on shadow versions, feedback and monitoring, over both doors of a real
in-process service: each call's answer comes back as the same model whichever door carried it."""

import asyncio
import re
import shutil
from pathlib import Path

import pytest

from adapters.kinds import HeadKind
from client import cli
from client.errors import AlreadyExists, InvalidArgument, NotFound
from harness.inprocess import client_of
from harness.sample_data import fashion_mnist_pngs, textile_files
from service.config import Settings
from service.core import Core
from service.runtime import Runtime
from service.training import TrainRequest
from tests.unit.test_engine import TENANT, png, save_random_head

pytestmark = pytest.mark.anyio
DOORS = ["http", "grpc"]
IMAGES = [png(seed) for seed in range(5)]


@pytest.fixture
def runtime(make_core, tmp_path) -> Runtime:
    """Head 'h': version 1 (aliased prod) and version 2, the same four classes, different weights."""
    core = make_core(tmp_path)
    save_random_head(core, "h", HeadKind.LINEAR, seed=1)
    save_random_head(core, "h", HeadKind.LINEAR, seed=2)
    core.heads.set_alias(TENANT, "h", "prod", 1)
    runtime = Runtime.around(core)
    runtime.tenants.create_tenant(TENANT)
    return runtime


@pytest.fixture
def key(runtime: Runtime) -> str:
    return runtime.tenants.create_key(TENANT).secret


def image_files(folder: Path) -> list[str]:
    paths = []
    for number, data in enumerate(IMAGES):
        path = folder / f"{number}.png"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


async def graft(monkeypatch, key: str, url: str, *args: str) -> int:
    """``graft --url URL ARGS...`` as the tenant, in a thread (the in-process server runs on this loop)."""
    monkeypatch.setenv("GRAFT_CONFIG", "/nonexistent/graft.toml")
    monkeypatch.setenv("GRAFT_API_KEY", key)
    return await asyncio.to_thread(cli.main, ["--url", url, *args])


@pytest.mark.parametrize("door", DOORS)
async def test_the_client_sets_a_shadow_predicts_with_it_compares_and_clears_it(runtime, key, door):
    async with client_of(runtime, key, door) as graft_client:
        head = await asyncio.to_thread(graft_client.set_shadow, "h", 2)
        assert head.shadow_version == 2 and (await asyncio.to_thread(graft_client.get_head, "h")).shadow_version == 2
        answers = await asyncio.to_thread(graft_client.predict, IMAGES, "h:prod", include_shadow=True)
        plain = await asyncio.to_thread(graft_client.predict, IMAGES[:1], "h:prod")
        found = await asyncio.to_thread(graft_client.compare, "h")
        cleared = await asyncio.to_thread(graft_client.clear_shadow, "heads/h")
    for answer in answers:
        [served] = answer.heads
        assert served.version == 1 and served.shadow is not None and served.shadow.version == 2
        assert served.shadow.prediction_set is None and served.shadow.shadow is None
    assert plain[0].heads[0].shadow is None  # scored, not returned, unless asked
    assert found.head == "h"
    [comparison] = found.comparisons
    assert (comparison.served_version, comparison.shadow_version) == (1, 2)
    assert comparison.compared == len(IMAGES) + 1 and sum(map(sum, comparison.confusion)) == len(IMAGES) + 1
    assert comparison.labels == ["c0", "c1", "c2", "c3"] and comparison.served_accuracy is None
    agreed = sum(a.heads[0].top[0].label == a.heads[0].shadow.top[0].label for a in answers)  # type: ignore[union-attr]
    assert comparison.agreement is not None and comparison.agreement >= agreed / (len(IMAGES) + 1)
    assert cleared.shadow_version is None


@pytest.mark.parametrize("door", DOORS)
async def test_graft_shadow_predict_and_compare_print_the_shadow_and_the_comparison(
    runtime, key, door, tmp_path, monkeypatch, capsys
):
    files = image_files(tmp_path)
    async with client_of(runtime, key, door) as graft_client:
        url = graft_client.url
        assert await graft(monkeypatch, key, url, "shadow", "h", "2") == 0, capsys.readouterr().err
        assert "h: version 2 answers every prediction beside the served one" in capsys.readouterr().out
        assert await graft(monkeypatch, key, url, "predict", "h:prod", *files, "--include-shadow") == 0
        table = capsys.readouterr().out.splitlines()
        assert await graft(monkeypatch, key, url, "compare", "h") == 0
        compared = capsys.readouterr().out
        assert await graft(monkeypatch, key, url, "heads", "h") == 0
        listed = [row.split() for row in capsys.readouterr().out.splitlines()[1:]]
        assert await graft(monkeypatch, key, url, "shadow", "h", "--clear") == 0
        assert capsys.readouterr().out == "h: no shadow (its comparisons are kept: graft compare h)\n"
        assert await graft(monkeypatch, key, url, "shadow", "h") == cli.EXIT_USAGE
        assert "or --clear" in capsys.readouterr().err
    assert table[0].split() == ["file", "head", "label", "score", "shadow", "prediction", "id"]
    rows = [row.split() for row in table[1:]]
    assert [row[0] for row in rows] == files and all(row[1] == "h@1" and row[4] == "@2" for row in rows)
    assert len({row[-1] for row in rows}) == len(files)  # one prediction id per image
    assert compared.startswith(f"h: shadow version 2 beside served version 1\n  {len(files)} images compared: ")
    assert "served \\ shadow  c0" in compared  # the confusion, served labels down, the shadow's across
    assert [(row[1], row[-1]) for row in listed] == [("1", "prod"), ("2", "(shadow)")]


@pytest.mark.parametrize("door", DOORS)
async def test_feedback_scores_the_served_version_and_its_shadow_once_per_prediction(runtime, key, door):
    async with client_of(runtime, key, door) as graft_client:
        await asyncio.to_thread(graft_client.set_shadow, "h", 2)
        [answer] = await asyncio.to_thread(graft_client.predict, IMAGES[:1], "h:prod", include_shadow=True)
        assert answer.prediction_id
        served, shadow = answer.heads[0].top[0].label, answer.heads[0].shadow.top[0].label  # type: ignore[union-attr]
        found = await asyncio.to_thread(graft_client.report_feedback, answer.prediction_id, served)
        with pytest.raises(AlreadyExists):
            await asyncio.to_thread(graft_client.report_feedback, answer.prediction_id, served)
        with pytest.raises(NotFound):
            await asyncio.to_thread(graft_client.report_feedback, "p_no_such_prediction", served)
        [other] = await asyncio.to_thread(graft_client.predict, IMAGES[1:2], "h:prod")
        with pytest.raises(InvalidArgument):
            await asyncio.to_thread(graft_client.report_feedback, other.prediction_id, "no-such-class")
        [comparison] = (await asyncio.to_thread(graft_client.compare, "h")).comparisons
    assert (found.prediction_id, found.label) == (answer.prediction_id, served)
    [verdict] = found.heads
    assert (verdict.head, verdict.version, verdict.correct) == ("h", 1, True)
    assert (verdict.shadow_version, verdict.shadow_correct) == (2, shadow == served)
    assert comparison.labelled == 1 and comparison.served_accuracy == 1.0
    assert comparison.shadow_accuracy == (1.0 if shadow == served else 0.0)


@pytest.mark.parametrize("door", DOORS)
async def test_graft_feedback_prints_whether_each_version_was_right(runtime, key, door, tmp_path, monkeypatch, capsys):
    [image] = image_files(tmp_path)[:1]
    async with client_of(runtime, key, door) as graft_client:
        url = graft_client.url
        assert await graft(monkeypatch, key, url, "predict", "h", image, "--csv", "--top-k", "1") == 0
        header, row = capsys.readouterr().out.splitlines()
        assert header == "file,head,version,rank,label,score,prediction_id"
        label, prediction_id = row.split(",")[4], row.split(",")[-1]
        assert await graft(monkeypatch, key, url, "feedback", prediction_id, label) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == f"{prediction_id}: {label!r} recorded; h@2 right\n"
        assert await graft(monkeypatch, key, url, "feedback", prediction_id, label) == cli.EXIT_ERROR
        assert "already has feedback" in capsys.readouterr().err


WINDOW = 30  # the smallest window a drift test runs on
SHIFTED = [data for data, _ in fashion_mnist_pngs("test", per_class=3, seed=1)][:WINDOW]  # not textiles


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_core) -> Path:
    """A data folder whose registry holds 'textile' version 1, a prototype head on textile JPEGs."""
    data_dir = tmp_path_factory.mktemp("trained")
    core = make_core(data_dir)
    dataset = core.datasets.create(TENANT, "textile", textile_files(per_class=20))
    core.trainer.train(TENANT, TrainRequest(dataset_id=dataset.id, head_name="textile", kind="prototype"))
    return data_dir


@pytest.fixture
def drifting(trained, mobilenet, tmp_path) -> Runtime:
    """A copy of ``trained`` whose version 1 has served one window of Fashion-MNIST images: drifting."""
    shutil.copytree(trained, tmp_path / "data")
    core = Core.open(Settings(data_dir=tmp_path / "data", monitor_window=WINDOW), backbones=[])
    core.backbones[mobilenet.name] = mobilenet
    runtime = Runtime.around(core)
    runtime.tenants.create_tenant(TENANT)
    return runtime


@pytest.mark.parametrize("door", DOORS)
async def test_the_client_reads_a_drifting_versions_monitoring_and_clears_its_drift(drifting, door):
    key = drifting.tenants.create_key(TENANT).secret
    async with client_of(drifting, key, door) as graft_client:
        await asyncio.to_thread(graft_client.predict, SHIFTED, "textile")
        served = await asyncio.to_thread(graft_client.monitor, "textile")
        named = await asyncio.to_thread(graft_client.monitor, "heads/textile", 1)
        cleared = await asyncio.to_thread(graft_client.clear_drift, "textile", 1)
    assert served == named
    assert (served.head, served.version, served.status, served.reference) == ("textile", 1, "drifting", True)
    assert served.labels == ["global", "local", "nominal"] and len(served.training_label_distribution) == 3
    [window] = served.windows
    assert window.predictions == WINDOW and sum(window.label_counts) == WINDOW and window.ood_rate is not None
    assert window.drift is not None and window.drift.drifting and window.drift.statistic > window.drift.threshold
    assert served.evidence == window and served.drifting_since == window.end_time
    assert (cleared.status, cleared.evidence, cleared.windows) == ("ok", None, [window])


@pytest.mark.parametrize("door", DOORS)
async def test_graft_monitor_prints_the_status_its_evidence_and_a_table_of_windows(drifting, door, monkeypatch, capsys):
    key = drifting.tenants.create_key(TENANT).secret
    async with client_of(drifting, key, door) as graft_client:
        await asyncio.to_thread(graft_client.predict, SHIFTED, "textile")
        url = graft_client.url
        assert await graft(monkeypatch, key, url, "monitor", "textile") == 0, capsys.readouterr().err
        shown = capsys.readouterr().out.splitlines()
        assert await graft(monkeypatch, key, url, "monitor", "textile", "--clear-drift") == cli.EXIT_USAGE
        assert "graft monitor HEAD@VERSION --clear-drift" in capsys.readouterr().err
        assert await graft(monkeypatch, key, url, "monitor", "textile@1", "--clear-drift") == 0
        assert capsys.readouterr().out.startswith("textile@1: ok\n")
    assert shown[0].startswith("textile@1: drifting since ")
    assert shown[1].startswith("  evidence: the window ending ") and shown[1].endswith(" drifting")
    assert shown[2].startswith("  ood rate        ") and shown[3].startswith("  drift/threshold ")
    header, row = re.split(r"\s{2,}", shown[5]), shown[6]
    assert header[:3] == ["end time", "predictions", "ood rate"] and len(shown) == 7
    assert f"  {WINDOW}  " in row and row.endswith(" drifting")
