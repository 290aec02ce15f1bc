"""The registry schema comes from Alembic migrations, on SQLite and on a real PostgreSQL.

An empty database gets exactly the schema of the models; a database made by graft 0.1 (``create_all``, no
version table) is upgraded in place with its rows kept and the new columns backfilled from the blob folder.
"""

import hashlib

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.store import migrate
from service.store.db import Base, Database


def schema_differences(url: str) -> list:
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)


def test_migrating_an_empty_database_gives_exactly_the_models_schema(registry_url):
    Database(registry_url).close()
    assert schema_differences(registry_url) == []


def test_opening_a_migrated_database_again_changes_nothing(registry_url):
    Database(registry_url).close()
    Database(registry_url).close()  # a second replica, or a restart
    assert schema_differences(registry_url) == []


def create_graft_0_1_database(url: str) -> None:
    """What graft 0.1's ``create_all`` left: revision 0001's tables and no alembic_version table."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(migrate.MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, migrate.FIRST_REVISION)
        connection.execute(sa.text("DROP TABLE alembic_version"))
    engine.dispose()


def test_a_graft_0_1_database_is_upgraded_with_its_rows_kept_and_backfilled(registry_url, tmp_path):
    create_graft_0_1_database(registry_url)
    image = b"\x89PNG pretend image bytes"
    sha = hashlib.sha256(image).hexdigest()
    blob_dir = tmp_path / "blobs"
    (blob_dir / "sha" / sha[:2] / sha[2:4]).mkdir(parents=True)
    (blob_dir / "sha" / sha[:2] / sha[2:4] / sha).write_bytes(image)
    weights = b"safetensors pretend weights"
    (blob_dir / "named" / "heads").mkdir(parents=True)
    (blob_dir / "named" / "heads" / "w1.safetensors").write_bytes(weights)
    engine = sa.create_engine(registry_url)
    with engine.begin() as c:
        c.execute(
            sa.text(
                "INSERT INTO datasets (id, tenant, name, created_at, num_examples, classes) "
                "VALUES ('ds_1', 'acme', 'old', '2026-01-01 00:00:00', 2, '[\"a\", \"b\"]')"
            )
        )
        for position, label in enumerate(("a", "b")):
            c.execute(
                sa.text(
                    "INSERT INTO examples (dataset_id, image_sha256, label, position) "
                    "VALUES ('ds_1', :sha, :label, :position)"
                ),
                {"sha": sha, "label": label, "position": position},
            )
        for version in (1, 3):
            c.execute(
                sa.text(
                    "INSERT INTO head_versions (tenant, name, version, backbone, split_point, kind, classes, config, "
                    "hyperparams, metrics, dataset_id, job_id, blob_key, param_bytes, created_at) VALUES "
                    "('acme', 'h', :v, 'mobilenet_v2', 19, 'linear', '[]', '{}', '{}', '{}', 'ds_1', NULL, "
                    "'heads/w1.safetensors', 10, '2026-01-01 00:00:00')"
                ),
                {"v": version},
            )
        c.execute(
            sa.text(
                "INSERT INTO jobs (id, tenant, state, phase, progress, message, request, metrics, head_name, "
                "head_version, error, cancel_requested, worker, heartbeat_at, created_at) VALUES ('job_1', 'acme', "
                "'succeeded', 'done', 1.0, 'ok', '{}', '{}', 'h', 1, NULL, false, 'host:1', '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00')"
            )
        )
    engine.dispose()

    Database(registry_url, blob_dir).close()

    assert schema_differences(registry_url) == []
    engine = sa.create_engine(registry_url)
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT stored_bytes FROM datasets")).scalar() == len(image)
        assert c.execute(sa.text("SELECT count(*) FROM examples")).scalar() == 2
        assert c.execute(sa.text("SELECT sha256, size, pinned_until FROM blobs")).one() == (sha, len(image), None)
        assert c.execute(sa.text("SELECT last_version FROM head_names WHERE name = 'h'")).scalar() == 3
        shas = set(c.execute(sa.text("SELECT weights_sha256 FROM head_versions")).scalars())
        assert shas == {hashlib.sha256(weights).hexdigest()}
        assert c.execute(sa.text("SELECT attempts, worker FROM jobs")).one() == (0, "host:1")
    engine.dispose()
