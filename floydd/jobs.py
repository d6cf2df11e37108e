"""Jobs: their states, the legal transitions between them, and their record."""

from __future__ import annotations

import dataclasses
import enum
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


class JobMode(enum.StrEnum):
    SERVE = "serve"
    COMMAND = "command"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    # A serve job whose app accepts connections.
    SERVING = "serving"
    # A command job whose container runs.
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT})

_ENDINGS = FINAL_STATES
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.FAILED, JobState.STOPPED, JobState.TIMED_OUT}),
    JobState.STARTING: frozenset({JobState.SERVING, JobState.RUNNING} | _ENDINGS),
    JobState.SERVING: _ENDINGS,
    JobState.RUNNING: _ENDINGS,
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.STOPPED: frozenset(),
    JobState.TIMED_OUT: frozenset(),
}


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: str, current: JobState, target: JobState) -> None:
        super().__init__(f"job {job_id}: illegal transition {current} -> {target}")


def new_job_id() -> str:
    """Return a random job id of 128 bits, so an endpoint URL cannot be guessed."""
    return secrets.token_hex(16)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Job:
    id: str
    mode: JobMode
    env: str
    image: str
    state: JobState
    created_at: datetime
    deadline: datetime
    command: str | None = None
    reason: str | None = None
    exit_code: int | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    container_id: str | None = None
    # Host port on 127.0.0.1 that Docker published for the app's port 5000.
    host_port: int | None = None
    # Name of the user whose token created the job; None before tokens exist.
    owner: str | None = None
    # Per-job requests beyond the basics (concurrency, GPUs, datasets, limits),
    # stored as JSON so that adding one needs no schema change.
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def transition(self, target: JobState, **changes: Any) -> Job:
        """Return a copy in `target` state; raise IllegalTransition when not allowed."""
        if target not in TRANSITIONS[self.state]:
            raise IllegalTransition(self.id, self.state, target)
        if target.is_final and self.ended_at is None:
            changes.setdefault("ended_at", utcnow())
        return dataclasses.replace(self, state=target, **changes)

    def to_json(self, base_url: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "state": self.state.value,
            "mode": self.mode.value,
            "env": self.env,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "deadline": _iso(self.deadline),
            "reason": self.reason,
            "exit_code": self.exit_code,
            "owner": self.owner,
            "private": bool(self.options.get("private", False)),
            # What the submission asked for, as accepted: datasets resolved to versions, caps applied.
            "data": [dict(entry) for entry in self.options.get("data", [])],
            "memory_bytes": self.options.get("memory_bytes"),
            "cpus": self.options.get("cpus"),
            "gpus": int(self.options.get("gpus", 0)),
        }
        if self.mode is JobMode.COMMAND:
            body["command"] = self.command
        else:
            body["endpoint"] = f"{base_url}/expose/{self.id}"
            body["concurrency"] = int(self.options.get("concurrency", 1))
        return body


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")
