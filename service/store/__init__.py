"""Storage: registry database, blobs, datasets, feature cache and head registry.

Everything here is backend-neutral: SQLAlchemy for rows (SQLite or PostgreSQL)
and a directory for blobs. Callers pass a tenant to every call; nothing here
returns another tenant's data. (Import the modules themselves: re-exporting
them here would load torch for every importer, the admin CLI included.)
"""
