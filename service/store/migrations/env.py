"""Alembic environment for the registry database; run by ``service.store.migrate`` (never by hand-editing SQL).

The connection comes from the caller (``config.attributes["connection"]``), so migrations run inside the
caller's transaction and under its lock.
"""

from alembic import context

from service.store.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters tables by copying them
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
