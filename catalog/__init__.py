"""The catalog: what exists, what ran, what can be restored (SQLAlchemy + Alembic).
``catalog.store.Catalog`` opens it; ``catalog.reader`` lists from it without SQLAlchemy."""
