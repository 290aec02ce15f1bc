"""The `graft` command and the Python client as a user drives them, against one real `bentoml serve`.

The CLI runs as a subprocess (a pseudo-terminal where the progress bar matters);
the Python client runs over both transports. Error cases check the documented
exit codes and one-line messages: a wrong key, an unknown head, a server that is
down, and a 429 from the prediction rate quota (with its Retry-After honoured).
"""

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client import RetryPolicy, connect
from client.errors import NotFound, ResourceExhausted, Unauthenticated, Unavailable
from harness.sample_data import textile_dir
from harness.servers import ADMIN_KEY, free_port, start_server

GRAFT = str(Path(sys.executable).parent / "graft")
CLASSES = ["global", "local", "nominal"]
TRAIN_PER_CLASS = 40
HELD_OUT = [
    f"{label}/{path.name}" for label in CLASSES for path in sorted((textile_dir() / label).glob("*.jpg"))[100:103]
]
# Low enough that one tenant can exhaust it on purpose, high enough for the others' few predictions.
RATE = {"GRAFT_QUOTA_PREDICT_IMAGES_PER_S": "0.5", "GRAFT_QUOTA_PREDICT_BURST": "64"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("server"), **RATE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A class-folder subset of the textile images to upload, and the held-out files to predict."""
    root = tmp_path_factory.mktemp("textiles")
    for label in CLASSES:
        (root / "train" / label).mkdir(parents=True)
        for path in sorted((textile_dir() / label).glob("*.jpg"))[:TRAIN_PER_CLASS]:
            shutil.copy(path, root / "train" / label / path.name)
    for name in HELD_OUT:
        (root / "held_out" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(textile_dir() / name, root / "held_out" / name)
    shutil.make_archive(str(root / "train"), "zip", root / "train")  # the same images as a zip ...
    rows = [f"train/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted((root / "train").glob("*/*.jpg"))]
    (root / "train.csv").write_text("path,label\n" + "\n".join(rows) + "\n")  # ... and as a CSV
    return root


def graft(*args: str, url: str, key: str | None, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")} | {"GRAFT_URL": url}
    env |= {"GRAFT_API_KEY": key} if key else {}
    env["GRAFT_CONFIG"] = "/nonexistent/graft.toml"
    return subprocess.run([GRAFT, *args], env=env, capture_output=True, text=True, timeout=300, check=False, **kwargs)


def graft_in_terminal(*args: str, url: str, key: str, answer_interrupt: str | None = None) -> tuple[int, str]:
    """Run graft with a pseudo-terminal as stdin/stdout/stderr; optionally press Ctrl-C once progress shows."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env |= {"GRAFT_URL": url, "GRAFT_API_KEY": key, "GRAFT_CONFIG": "/nonexistent/graft.toml", "COLUMNS": "160"}
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(GRAFT, [GRAFT, *args], env)
    output, interrupted, deadline = b"", False, time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        if answer_interrupt is not None and not interrupted and b"search" in output:
            os.write(fd, b"\x03")  # Ctrl-C, as the terminal sends it
            interrupted = True
        if interrupted and answer_interrupt is not None and b"[y/N]" in output:
            os.write(fd, answer_interrupt.encode() + b"\n")
            answer_interrupt = None
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


@pytest.fixture(scope="module")
def tenant(server) -> str:
    """A tenant's key, made with `graft admin` as an operator would."""
    admin = graft("admin", "create-tenant", "acme", url=server.http_url, key=ADMIN_KEY)
    assert admin.returncode == 0, admin.stderr
    created = graft("admin", "create-key", "acme", url=server.http_url, key=ADMIN_KEY)
    assert created.returncode == 0, created.stderr
    return created.stdout.strip()


def test_upload_train_predict_from_the_command_line(server, images, tenant, tmp_path):
    code, upload = graft_in_terminal(
        "upload", str(images / "train"), "--name", "textiles", url=server.http_url, key=tenant
    )
    assert code == 0, upload
    assert f"{3 * TRAIN_PER_CLASS}/{3 * TRAIN_PER_CLASS} images" in upload  # the progress bar by images and bytes
    assert "KiB" in upload and f"{3 * TRAIN_PER_CLASS} images, 3 classes" in upload

    code, train = graft_in_terminal("train", "textiles", "--head", "weave", url=server.http_url, key=tenant)
    assert code == 0, train
    assert "\r[" in train and "search" in train and "best hold-out accuracy" in train  # a live bar, redrawn
    assert "heads/weave/versions/1: succeeded, hold-out accuracy" in train

    table = graft("predict", "weave", str(images / "held_out"), url=server.http_url, key=tenant)
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    assert [Path(row[0]).relative_to(images / "held_out").as_posix() for row in rows] == HELD_OUT
    labels = [row[2] for row in rows]
    correct = sum(label == name.split("/")[0] for label, name in zip(labels, HELD_OUT, strict=True))
    assert correct >= 6, f"only {correct} of {len(HELD_OUT)} held-out images right: {labels}"

    as_json = graft(
        "predict", "weave", *(str(images / "held_out" / n) for n in HELD_OUT), "--json", url=server.http_url, key=tenant
    )
    assert [json.loads(line)["heads"][0]["top"][0]["label"] for line in as_json.stdout.splitlines()] == labels
    as_csv = graft(
        "predict", "weave", str(images / "held_out"), "--csv", "--top-k", "2", url=server.http_url, key=tenant
    )
    assert as_csv.stdout.splitlines()[0] == "file,head,version,rank,label,score,prediction_id"
    assert len(as_csv.stdout.splitlines()) == 1 + 2 * len(HELD_OUT)
    # No score reaches 1: every head abstains ("unknown"); each prediction set starts with the best label.
    unsure = graft(
        "predict",
        "weave",
        str(images / "held_out"),
        "--min-score",
        "1",
        "--coverage",
        "0.5",
        url=server.http_url,
        key=tenant,
    )
    assert unsure.returncode == 0, unsure.stderr
    assert [row.split()[2] for row in unsure.stdout.splitlines()[1:]] == ["unknown"] * len(HELD_OUT)
    assert [row.split()[4] for row in unsure.stdout.splitlines()[1:]] == labels  # the set column, best label first
    bad = graft("predict", "weave", str(images / "held_out"), "--coverage", "1", url=server.http_url, key=tenant)
    assert bad.returncode == 2 and "argument --coverage: must be a number > 0 and < 1" in bad.stderr

    alias = graft("alias", "weave", "prod", "1", url=server.http_url, key=tenant)
    assert alias.returncode == 0 and "weave:prod -> version 1" in alias.stdout
    heads = graft("heads", url=server.http_url, key=tenant)
    assert heads.stdout.split("\n")[1].split()[:3] == ["weave", "1", "linear"] and "prod" in heads.stdout
    exported = graft("export", "weave:prod", "-o", str(tmp_path / "weave.safetensors"), url=server.http_url, key=tenant)
    assert exported.returncode == 0 and (tmp_path / "weave.safetensors").stat().st_size > 1000

    report = graft("report", "weave:prod", "-o", str(tmp_path / "report.png"), url=server.http_url, key=tenant)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_during_training_asks_then_cancels_the_job(server, tenant):
    code, output = graft_in_terminal(
        "train",
        "textiles",
        "--head",
        "slow",
        "--kind",
        "mlp",
        "--hyperparams",
        '{"epochs": 300}',
        url=server.http_url,
        key=tenant,
        answer_interrupt="y",
    )
    assert "cancel jobs/" in output and "[y/N]" in output
    assert code == 4, output
    assert output.rstrip().endswith("cancelled")


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_the_python_client_uploads_trains_and_predicts(server, images, tenant, transport):
    url = server.http_url if transport == "http" else f"grpc://{server.grpc_target}"
    sent: list[tuple[int, int]] = []
    with connect(url, tenant) as client:
        dataset = client.create_dataset(
            images / "train", f"textiles-{transport}", progress=lambda b, n: sent.append((b, n))
        )
        assert dataset.example_count == 3 * TRAIN_PER_CLASS and dataset.examples_per_class == dict.fromkeys(
            CLASSES, TRAIN_PER_CLASS
        )
        assert sent[-1][1] == 3 * TRAIN_PER_CLASS and sent == sorted(sent)
        for other in (images / "train.zip", images / "train.csv"):
            same = client.create_dataset(other, f"{other.suffix}-{transport}")
            assert (same.example_count, same.examples_per_class) == (dataset.example_count, dataset.examples_per_class)

        job = client.train(dataset.name, f"weave-{transport}", hyperparams={"epochs": 5})
        assert job.state == "queued" and job.spec.dataset == dataset.name
        states = []
        done = client.wait(job.name, on_update=lambda update: states.append(update.state))
        assert done.state == "succeeded" and done.head_version == f"heads/weave-{transport}/versions/1"
        assert "running" in states

        head = client.get_head(f"weave-{transport}")
        assert set(head.version().metrics) >= {"accuracy", "ece"} and head.version().classes == CLASSES  # summary
        assert client.get_head_version(head.display, 1).metrics["reliability"]  # the whole metrics
        predictions = client.predict([images / "held_out" / n for n in HELD_OUT], head.display, top_k=3)
        assert [p.heads[0].head for p in predictions] == [head.display] * len(HELD_OUT)
        assert all(sorted(t.label for t in p.heads[0].top) == CLASSES for p in predictions)
        labels = [p.heads[0].top[0].label for p in predictions]
        assert sum(label == n.split("/")[0] for label, n in zip(labels, HELD_OUT, strict=True)) >= 6
        assert all(not p.heads[0].abstained and p.heads[0].prediction_set is None for p in predictions)
        unsure = client.predict([images / "held_out" / HELD_OUT[0]], head.display, min_score=1.0, coverage=0.5)
        assert unsure[0].heads[0].abstained and unsure[0].heads[0].prediction_set[0] == labels[0]

        client.set_alias(head.display, "prod", 1)
        assert client.get_head(head.display).aliases["prod"] == 1
        client.remove_alias(head.display, "prod")
        assert "prod" not in client.get_head(head.display).aliases
        weights = client.export(head.display)  # safetensors: an 8-byte header length, then a JSON header
        header = json.loads(weights[8 : 8 + int.from_bytes(weights[:8], "little")])
        assert any(name.endswith("weight") for name in header)


def test_a_wrong_key_exits_with_a_one_line_error(server):
    result = graft("heads", url=server.http_url, key="graft_wrong_key")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("graft: unauthenticated:")
    assert "--api-key or GRAFT_API_KEY" in result.stderr
    with pytest.raises(Unauthenticated), connect(f"grpc://{server.grpc_target}", "graft_wrong_key") as client:
        client.list_heads()


def test_an_unknown_head_exits_with_not_found(server, images, tenant):
    result = graft("predict", "no-such-head", str(images / "held_out" / HELD_OUT[0]), url=server.http_url, key=tenant)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("graft: not_found:")
    for url in (server.http_url, f"grpc://{server.grpc_target}"):
        with pytest.raises(NotFound), connect(url, tenant) as client:
            client.get_head("no-such-head")


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_a_server_that_is_down_exits_3_saying_what_to_check(scheme):
    url = f"{scheme}://127.0.0.1:{free_port()}"
    result = graft("heads", url=url, key="graft_any")
    assert result.returncode == 3
    assert result.stderr.count("\n") == 1 and f"cannot reach graft at {url}" in result.stderr
    assert "GRAFT_URL" in result.stderr
    with pytest.raises(Unavailable), connect(url, "graft_any", retry=RetryPolicy(attempts=2, base_delay_s=0.1)) as c:
        c.list_heads()


def test_a_429_is_retried_after_its_retry_after_or_reported_in_one_line(server, images):
    assert graft("admin", "create-tenant", "busy", url=server.http_url, key=ADMIN_KEY).returncode == 0
    key = graft("admin", "create-key", "busy", url=server.http_url, key=ADMIN_KEY).stdout.strip()
    image = str(images / "held_out" / HELD_OUT[0])
    burst = int(RATE["GRAFT_QUOTA_PREDICT_BURST"])
    with connect(server.http_url, key, retry=RetryPolicy(attempts=1)) as client:
        dataset = client.create_dataset(images / "train", "busy")
        assert client.wait(client.train(dataset.name, "busy").name).state == "succeeded"
        client.predict([image] * burst, "busy", batch_size=burst)  # spends the tenant's whole burst
        with pytest.raises(ResourceExhausted) as refused:
            client.predict([image] * 4, "busy")
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1

    # By default the CLI waits as long as Retry-After says (the bucket refills at 0.5 image/s), then answers.
    waited = graft("predict", "busy", *[image] * 4, url=server.http_url, key=key)
    assert waited.returncode == 0, waited.stderr
    assert [line.split()[0] for line in waited.stdout.splitlines()[1:]] == [image] * 4
    # Told not to retry, it says so in one line.
    refused_cli = graft("--retries", "0", "predict", "busy", *[image] * 4, url=server.http_url, key=key)
    assert refused_cli.returncode == 1
    assert refused_cli.stderr.count("\n") == 1 and refused_cli.stderr.startswith("graft: resource_exhausted:")
