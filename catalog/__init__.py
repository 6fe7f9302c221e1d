"""The catalog: what exists, what ran, what can be restored (SQLAlchemy + Alembic)."""
from virtwarden.catalog.store import Catalog

__all__ = ["Catalog"]
