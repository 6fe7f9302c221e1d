"""The catalog: what exists, what ran, what can be restored (SQLAlchemy + Alembic)."""
from catalog.store import Catalog

__all__ = ["Catalog"]
