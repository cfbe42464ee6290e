"""The database: SQLite embedded (default) or PostgreSQL shared by many gateways.

`open_store(settings)` is the one way to open it; TenantStore and JobStore are written
once against `Store` (base.py)."""

from tuneserve.db.base import Store, StoreError
from tuneserve.db.factory import is_shared, open_store

__all__ = ["Store", "StoreError", "is_shared", "open_store"]
