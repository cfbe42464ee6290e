"""Schema changes per dialect, applied in order; `schema_version` records how many ran.

Append only: never edit or reorder an entry once it has shipped. Each entry is a tuple
of single statements (not a script: SQLite's `executescript` would COMMIT the
migration's transaction halfway). The two lists keep the same numbering, so a version
means the same tables on either backend.
"""

from __future__ import annotations

from tuneserve.db.base import Dialect

Migrations = tuple[tuple[str, ...], ...]

SQLITE: Migrations = (
    # 1: tenants. Only the key's hash is stored; key_id is the non-secret part of the
    # key that finds the row (UNIQUE gives it an index).
    (
        """
        CREATE TABLE tenants (
            name TEXT PRIMARY KEY,
            key_id TEXT NOT NULL UNIQUE,
            key_hash BLOB NOT NULL,
            created_at TEXT NOT NULL,
            key_rotated_at TEXT NOT NULL
        )
        """,
    ),
    # 2: merge/export jobs (merge/jobs.py). pid + pid_start identify the process that
    # runs a job, so a later command can tell a live job from one whose process died.
    (
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            spec TEXT NOT NULL,
            progress REAL NOT NULL DEFAULT 0,
            stage TEXT NOT NULL DEFAULT '',
            log TEXT NOT NULL DEFAULT '',
            outputs TEXT NOT NULL DEFAULT '[]',
            report TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            pid INTEGER,
            pid_start TEXT,
            staging TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            started_at TEXT,
            heartbeat_at TEXT,
            finished_at TEXT
        )
        """,
        "CREATE INDEX jobs_status ON jobs (status, created_at)",
    ),
    # 3: jobs across machines: the owner ("host:pid:start") and its lease, in seconds
    # since the epoch, renewed by the heartbeat (tuneserve/jobs/lease.py).
    (
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_expires_at REAL",
    ),
    # 4: shared state of several gateways, used when the store is PostgreSQL (the embedded
    # default keeps the adapter registry's files and audit.log; the tables exist on both
    # so that a version number means the same schema). `adapters` is one row per name
    # ever stored: current_version NULL is a removed adapter whose last_version still
    # keeps its numbers from being reused. `adapter_versions` holds each version's manifest.
    (
        """
        CREATE TABLE adapters (
            tenant TEXT NOT NULL,
            name TEXT NOT NULL,
            current_version INTEGER,
            last_version INTEGER NOT NULL,
            PRIMARY KEY (tenant, name)
        )
        """,
        """
        CREATE TABLE adapter_versions (
            tenant TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            uid TEXT,
            sha256 TEXT NOT NULL,
            size_bytes INTEGER NOT NULL,
            manifest TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (tenant, name, version)
        )
        """,
        """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            result TEXT NOT NULL,
            details TEXT NOT NULL
        )
        """,
        "CREATE INDEX audit_ts ON audit (ts)",
    ),
)

POSTGRESQL: Migrations = (
    (
        """
        CREATE TABLE tenants (
            name TEXT PRIMARY KEY,
            key_id TEXT NOT NULL UNIQUE,
            key_hash BYTEA NOT NULL,
            created_at TEXT NOT NULL,
            key_rotated_at TEXT NOT NULL
        )
        """,
    ),
    (
        """
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            spec TEXT NOT NULL,
            progress DOUBLE PRECISION NOT NULL DEFAULT 0,
            stage TEXT NOT NULL DEFAULT '',
            log TEXT NOT NULL DEFAULT '',
            outputs TEXT NOT NULL DEFAULT '[]',
            report TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            pid INTEGER,
            pid_start TEXT,
            staging TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            started_at TEXT,
            heartbeat_at TEXT,
            finished_at TEXT
        )
        """,
        "CREATE INDEX jobs_status ON jobs (status, created_at)",
    ),
    (
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
        "ALTER TABLE jobs ADD COLUMN lease_expires_at DOUBLE PRECISION",
    ),
    (
        """
        CREATE TABLE adapters (
            tenant TEXT NOT NULL,
            name TEXT NOT NULL,
            current_version INTEGER,
            last_version INTEGER NOT NULL,
            PRIMARY KEY (tenant, name)
        )
        """,
        """
        CREATE TABLE adapter_versions (
            tenant TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            uid TEXT,
            sha256 TEXT NOT NULL,
            size_bytes BIGINT NOT NULL,
            manifest TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (tenant, name, version)
        )
        """,
        """
        CREATE TABLE audit (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            result TEXT NOT NULL,
            details JSONB NOT NULL
        )
        """,
        "CREATE INDEX audit_ts ON audit (ts)",
    ),
)

BY_DIALECT: dict[Dialect, Migrations] = {"sqlite": SQLITE, "postgresql": POSTGRESQL}


def latest(dialect: Dialect) -> int:
    return len(BY_DIALECT[dialect])
