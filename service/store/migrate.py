"""Schema migrations of the registry database (Alembic), run by every process that opens it.

An empty database gets the whole schema; an older one is upgraded in place, its rows kept. A database made by
graft 0.1 (``create_all``, no version table) is recognised and upgraded from there. On PostgreSQL an advisory
lock makes replicas that start together migrate one after the other; the migrations run in one transaction.
"""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"  # graft 0.1's schema
_LOCK_KEY = 0x67726166  # "graf": any constant shared by every replica


def upgrade(engine: Engine, blob_dir: Path | None = None) -> None:
    """Bring the schema to the newest revision. ``blob_dir`` lets data migrations read stored files."""
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            # a table copy (how SQLite alters tables) must not cascade deletes; the pragma only works outside a
            # transaction, so it comes first, and the next connection turns it back on (service.store.db)
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()  # end SQLAlchemy's autobegun transaction (SQLite itself began none)
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS))
            config.attributes["connection"] = connection
            config.attributes["blob_dir"] = blob_dir
            tables = inspect(connection)
            if not tables.has_table("alembic_version") and tables.has_table("jobs"):
                command.stamp(config, FIRST_REVISION)
            command.upgrade(config, "head")
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
