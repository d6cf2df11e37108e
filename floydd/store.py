"""Job records in SQLite, through aiosqlite.

Every change is committed before the call returns, with `synchronous=FULL`
in WAL mode, so a daemon killed at any moment restarts with every job that
it had acknowledged to a client.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from floydd.jobs import Job, JobMode, JobState

# Each entry upgrades the schema by one version; PRAGMA user_version records
# how many have run. Append new migrations, never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id           TEXT PRIMARY KEY,
        mode         TEXT NOT NULL,
        env          TEXT NOT NULL,
        image        TEXT NOT NULL,
        state        TEXT NOT NULL,
        command      TEXT,
        reason       TEXT,
        exit_code    INTEGER,
        created_at   TEXT NOT NULL,
        started_at   TEXT,
        ended_at     TEXT,
        deadline     TEXT NOT NULL,
        container_id TEXT,
        host_port    INTEGER,
        owner        TEXT,
        options      TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX jobs_state ON jobs (state);
    CREATE INDEX jobs_created_at ON jobs (created_at);
    """,
    """
    CREATE TABLE users (
        name       TEXT PRIMARY KEY,
        is_admin   INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL
    );
    CREATE TABLE tokens (
        id            TEXT PRIMARY KEY,
        user_name     TEXT NOT NULL REFERENCES users (name),
        secret_sha256 TEXT NOT NULL,
        created_at    TEXT NOT NULL,
        revoked_at    TEXT
    );
    CREATE INDEX tokens_user_name ON tokens (user_name);
    CREATE INDEX jobs_owner_state ON jobs (owner, state);
    """,
)

_COLUMNS = (
    "id", "mode", "env", "image", "state", "command", "reason", "exit_code",
    "created_at", "started_at", "ended_at", "deadline", "container_id", "host_port",
    "owner", "options",
)  # fmt: skip


class JobStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: aiosqlite.Connection | None = None

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._connection is None:
            raise RuntimeError("JobStore.open() was not called")
        return self._connection

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = await aiosqlite.connect(self.path)
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=FULL")
            await connection.execute("PRAGMA busy_timeout=5000")
            await _migrate(connection)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection

    @property
    def connection(self) -> aiosqlite.Connection:
        """The open connection, for other stores that keep their tables in the same file."""
        return self._db

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def insert(self, job: Job) -> None:
        row = _to_row(job)
        placeholders = ", ".join("?" for _ in _COLUMNS)
        await self._db.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", row)
        await self._db.commit()

    async def update(self, job: Job) -> None:
        row = _to_row(job)
        assignments = ", ".join(f"{column} = ?" for column in _COLUMNS[1:])
        await self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*row[1:], row[0]))
        await self._db.commit()

    async def delete(self, job_id: str) -> None:
        await self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        await self._db.commit()

    async def get(self, job_id: str) -> Job | None:
        async with self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _from_row(row)

    async def list(
        self, states: Iterable[JobState] | None = None, limit: int = 1000, owner: str | None = None
    ) -> list[Job]:
        """Return jobs, newest first, filtered by state and by owner when given."""
        query = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        conditions: list[str] = []
        params: list[Any] = []
        if states is not None:
            wanted = [state.value for state in states]
            conditions.append(f"state IN ({', '.join('?' for _ in wanted)})")
            params.extend(wanted)
        if owner is not None:
            conditions.append("owner = ?")
            params.append(owner)
        if conditions:
            query += " WHERE " + " AND ".join(conditions)
        query += " ORDER BY created_at DESC, id LIMIT ?"
        params.append(limit)
        async with self._db.execute(query, params) as cursor:
            rows = await cursor.fetchall()
        return [_from_row(row) for row in rows]

    async def count_unfinished(self, owner: str) -> int:
        """Count the jobs of `owner` that have not reached a final state."""
        unfinished = [state.value for state in JobState if not state.is_final]
        query = f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND state IN ({', '.join('?' for _ in unfinished)})"
        async with self._db.execute(query, (owner, *unfinished)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def count_by_state(self) -> dict[str, int]:
        """Return how many jobs are in each state that has any."""
        async with self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state") as cursor:
            rows = await cursor.fetchall()
        return {str(state): int(count) for state, count in rows}


async def _migrate(connection: aiosqlite.Connection) -> None:
    async with connection.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    version = int(row[0]) if row else 0
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"database schema version {version} is newer than this floydd knows ({len(MIGRATIONS)}); upgrade floydd"
        )
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        # executescript commits first, so each migration and its version bump land together.
        await connection.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")


def _to_row(job: Job) -> tuple[Any, ...]:
    return (
        job.id,
        job.mode.value,
        job.env,
        job.image,
        job.state.value,
        job.command,
        job.reason,
        job.exit_code,
        _time(job.created_at),
        _time(job.started_at),
        _time(job.ended_at),
        _time(job.deadline),
        job.container_id,
        job.host_port,
        job.owner,
        json.dumps(job.options, sort_keys=True),
    )


def _from_row(row: Any) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    return Job(
        id=values["id"],
        mode=JobMode(values["mode"]),
        env=values["env"],
        image=values["image"],
        state=JobState(values["state"]),
        command=values["command"],
        reason=values["reason"],
        exit_code=values["exit_code"],
        created_at=_parse_time(values["created_at"]),
        started_at=_parse_optional_time(values["started_at"]),
        ended_at=_parse_optional_time(values["ended_at"]),
        deadline=_parse_time(values["deadline"]),
        container_id=values["container_id"],
        host_port=values["host_port"],
        owner=values["owner"],
        options=json.loads(values["options"]),
    )


def _time(moment: datetime | None) -> str | None:
    # ISO 8601 in UTC with microseconds sorts correctly as text.
    return None if moment is None else moment.isoformat(timespec="microseconds")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _parse_optional_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
