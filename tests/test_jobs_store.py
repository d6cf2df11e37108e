"""Job states, transitions and their SQLite records."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from floydd.api import parse_duration
from floydd.errors import InvalidRequest
from floydd.jobs import TRANSITIONS, IllegalTransition, Job, JobMode, JobState, new_job_id, utcnow
from floydd.store import JobStore


def make_job(state: JobState = JobState.QUEUED) -> Job:
    now = utcnow()
    return Job(
        id=new_job_id(),
        mode=JobMode.SERVE,
        env="flask",
        image="floydd/flask:latest",
        state=state,
        created_at=now,
        deadline=now + timedelta(hours=1),
    )


def test_job_id_has_128_bits() -> None:
    assert len(new_job_id()) == 32
    assert int(new_job_id(), 16) >= 0


def test_final_states_have_no_exit() -> None:
    for state in JobState:
        assert (not TRANSITIONS[state]) == state.is_final


@pytest.mark.parametrize("state", [s for s in JobState if s.is_final])
def test_final_state_cannot_change(state: JobState) -> None:
    with pytest.raises(IllegalTransition):
        make_job(state).transition(JobState.STARTING)


def test_ending_sets_ended_at() -> None:
    job = make_job().transition(JobState.STARTING).transition(JobState.FAILED, reason="boom")
    assert job.ended_at is not None
    assert job.reason == "boom"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("3s", 3), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("1.5h", 5400)],
)
def test_parse_duration_units(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5", "0", "3w", "1e9"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_duration(text)


async def test_store_round_trip_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "floydd.sqlite3"
    store = JobStore(path)
    await store.open()
    job = make_job()
    await store.insert(job)
    serving = job.transition(JobState.STARTING).transition(JobState.SERVING, container_id="abc", host_port=32768)
    await store.update(serving)
    await store.close()

    reopened = JobStore(path)
    await reopened.open()
    try:
        assert await reopened.get(job.id) == serving
        assert [found.id for found in await reopened.list([JobState.SERVING])] == [job.id]
        assert await reopened.list([JobState.FAILED]) == []
        assert await reopened.get("missing") is None
    finally:
        await reopened.close()
