"""Aliases under concurrent writers, on SQLite and a real PostgreSQL: no IntegrityError, no alias to nothing.

Two replicas (two Database objects on one registry) race; one is held inside its transaction right before it
writes the alias (a hook on its own engine), while the other runs, so each interleaving is forced, not hoped for.
"""

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import event, select

from service.config import Settings
from service.errors import NotFound
from service.quotas import Quotas
from service.store.blobs import BlobStore
from service.store.db import Database, HeadAliasRow, HeadVersionRow
from service.store.heads import HeadRegistry

TENANT = "acme"
HELD_S = 0.5  # how long the held replica waits for the other one inside its transaction


@pytest.fixture
def replicas(registry_url: str, tmp_path: Path) -> Iterator[tuple[HeadRegistry, HeadRegistry]]:
    blobs, quotas = BlobStore(tmp_path / "blobs"), Quotas(Settings(data_dir=tmp_path))
    dbs = [Database(registry_url) for _ in range(2)]
    yield HeadRegistry(dbs[0], blobs, quotas), HeadRegistry(dbs[1], blobs, quotas)
    for db in dbs:
        db.close()


def create(registry: HeadRegistry) -> int:
    return registry.create_version(
        TENANT,
        "cats",
        tensors={"weight": torch.zeros(2, 4)},
        backbone="mobilenet_v2",
        split_point=None,
        kind="linear",
        classes=["a", "b"],
        config={},
        hyperparams={},
        metrics={},
        dataset_id="ds_1",
    ).version


def hold_before_alias_write(registry: HeadRegistry) -> threading.Event:
    """Pause ``registry``'s next write to head_aliases for HELD_S; the returned event is set when it pauses."""
    paused = threading.Event()

    def before(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO HEAD_ALIASES") and not paused.is_set():
            paused.set()
            threading.Event().wait(HELD_S)

    event.listen(registry.db.engine, "before_cursor_execute", before)
    return paused


def race(held: Callable[[], None], other: Callable[[], None], paused: threading.Event) -> list[BaseException]:
    """Run ``held`` until it pauses, then ``other`` beside it; the errors each raised."""
    errors: list[BaseException] = []

    def run(call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 (reported to the test)
            errors.append(exc)

    first = threading.Thread(target=run, args=(held,))
    first.start()
    assert paused.wait(10), "the held replica never reached its alias write"
    second = threading.Thread(target=run, args=(other,))
    second.start()
    first.join(30)
    second.join(30)
    return errors


def aliases(registry: HeadRegistry) -> dict[str, int]:
    with registry.db.session() as session:
        return {row.alias: row.version for row in session.scalars(select(HeadAliasRow))}


def versions(registry: HeadRegistry) -> set[int]:
    with registry.db.session() as session:
        return set(session.scalars(select(HeadVersionRow.version)))


def test_concurrent_first_setters_of_an_alias_both_succeed_and_one_wins(replicas):
    one, two = replicas
    first, second = create(one), create(one)
    paused = hold_before_alias_write(one)
    errors = race(
        lambda: one.set_alias(TENANT, "cats", "prod", first),
        lambda: two.set_alias(TENANT, "cats", "prod", second),
        paused,
    )
    assert errors == []
    assert aliases(one)["prod"] in (first, second)
    assert one.resolve(TENANT, "cats:prod").version == aliases(one)["prod"]


def test_an_alias_set_while_its_version_is_deleted_never_points_at_nothing(replicas):
    one, two = replicas
    create(one)
    doomed = create(one)
    paused = hold_before_alias_write(one)
    errors = race(
        lambda: one.set_alias(TENANT, "cats", "prod", doomed),
        lambda: two.delete_version(TENANT, "cats", doomed),
        paused,
    )
    assert all(isinstance(error, NotFound) for error in errors), errors
    assert doomed not in versions(one)
    assert set(aliases(one).values()) <= versions(one), "an alias points at a deleted version"
