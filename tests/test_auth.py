"""Tokens, owners and private jobs against a real daemon."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from typing import Any

import aiohttp
import pytest

from tests.conftest import APPS, CONFIG, Daemon, create_token, submit, submit_ok, tar_gz, wait_for_state
from tests.test_http_abuse import exchange

pytestmark = pytest.mark.docker


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def floydd_cli(daemon: Daemon, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "floydd", *args, "--config", str(CONFIG), "--state-dir", str(daemon.state_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def fetch(
    daemon: Daemon, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    """Send a request from a session without the admin token middleware."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"{daemon.url}{path}", headers=headers or {}) as response,
    ):
        body = await response.json(content_type=None)
        return response.status, dict(response.headers), body


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, None),
        (bearer("not-a-token"), "invalid_token"),
        (bearer("floydd_0123456789abcdef_" + "A" * 43), "invalid_token"),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, "invalid_request"),
        ({"Authorization": "floydd_0123456789abcdef_" + "A" * 43}, "invalid_request"),
    ],
    ids=["missing", "garbage", "unknown-id", "basic", "no-scheme"],
)
async def test_api_without_valid_token_is_401(daemon: Daemon, headers: dict[str, str], error: str | None) -> None:
    for method, path in [
        ("GET", "/api/v1/jobs"),
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/0123"),
        ("POST", "/api/v1/jobs/0123/stop"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/nothing"),
    ]:
        status, response_headers, body = await fetch(daemon, method, path, headers)
        assert status == 401, (method, path)
        assert body["error"] == "unauthorized"
        assert response_headers["WWW-Authenticate"].startswith('Bearer realm="floydd"')
        if error:
            assert f'error="{error}"' in response_headers["WWW-Authenticate"]


async def test_health_needs_no_token(daemon: Daemon) -> None:
    status, _, body = await fetch(daemon, "GET", "/healthz")
    assert status == 200
    assert body == {"status": "ok"}


async def test_token_cli_create_list_revoke(daemon: Daemon) -> None:
    code, token, _ = await floydd_cli(daemon, "token", "create", "dave")
    assert code == 0
    token = token.strip()
    token_id = token.split("_")[1]
    assert (await fetch(daemon, "GET", "/api/v1/jobs", bearer(token)))[0] == 200

    code, listing, _ = await floydd_cli(daemon, "token", "list")
    assert code == 0
    assert f"{token_id}\tdave\tuser" in listing
    assert token not in listing

    code, output, _ = await floydd_cli(daemon, "token", "revoke", token_id)
    assert code == 0
    assert "revoked" in output
    status, headers, _ = await fetch(daemon, "GET", "/api/v1/jobs", bearer(token))
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_token_cli_rejects_bad_input(daemon: Daemon) -> None:
    code, _, error = await floydd_cli(daemon, "token", "revoke", "0000000000000000")
    assert code == 1
    assert "no token with id" in error
    code, _, error = await floydd_cli(daemon, "token", "create", "../evil")
    assert code == 1
    assert "invalid user name" in error
    code, _, error = await floydd_cli(daemon, "token", "create", "admin")
    assert code == 1
    assert "is an admin" in error


async def test_database_has_no_token_secret(daemon: Daemon) -> None:
    secret = daemon.admin_token.split("_", 2)[2]
    rows = sqlite3.connect(daemon.state_dir / "floydd.sqlite3").execute("SELECT * FROM tokens").fetchall()
    assert rows
    assert all(secret not in str(row) for row in rows)


async def test_metrics_need_admin_token(daemon: Daemon) -> None:
    """The metrics name every job, so only an admin may read them."""
    alice = await create_token(daemon.state_dir, "alice")
    anonymous_status, anonymous_headers, _ = await fetch(daemon, "GET", "/metrics")
    user_status, _, user_body = await fetch(daemon, "GET", "/metrics", bearer(alice))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{daemon.url}/metrics", headers=bearer(daemon.admin_token)) as response,
    ):
        admin_status = response.status
        admin_text = await response.text()
    assert anonymous_status == 401
    assert anonymous_headers["WWW-Authenticate"].startswith("Bearer")
    assert user_status == 403
    assert "admin token" in user_body["detail"]
    assert admin_status == 200
    assert "floydd_jobs" in admin_text


async def test_users_see_only_own_jobs(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Any) -> None:
    alice, bob = await create_token(daemon.state_dir, "alice"), await create_token(daemon.state_dir, "bob")
    project = tmp_path / "p"
    project.mkdir()
    (project / "run.py").write_text("import time; time.sleep(60)\n")
    form = aiohttp.FormData()
    form.add_field("command", "python run.py")
    form.add_field("code", tar_gz(project), filename="p.tar.gz")
    async with client.post(f"{daemon.url}/api/v1/jobs", data=form, headers=bearer(alice)) as response:
        assert response.status == 201
        job = await response.json()
    assert job["owner"] == "alice"
    job_id = job["id"]

    for method, path in [("GET", f"/api/v1/jobs/{job_id}"), ("GET", f"/api/v1/jobs/{job_id}/logs")]:
        status, _, body = await fetch(daemon, method, path, bearer(bob))
        assert status == 404, path
        assert body["error"] == "job_not_found"
    status, _, _ = await fetch(daemon, "POST", f"/api/v1/jobs/{job_id}/stop", bearer(bob))
    assert status == 404
    assert (await fetch(daemon, "GET", "/api/v1/jobs", bearer(bob)))[2] == {"jobs": []}

    listed = (await fetch(daemon, "GET", "/api/v1/jobs", bearer(alice)))[2]
    assert [entry["id"] for entry in listed["jobs"]] == [job_id]
    everything = (await fetch(daemon, "GET", "/api/v1/jobs", bearer(daemon.admin_token)))[2]
    assert job_id in [entry["id"] for entry in everything["jobs"]]

    status, _, stopped = await fetch(daemon, "POST", f"/api/v1/jobs/{job_id}/stop", bearer(alice))
    assert status == 200
    assert stopped["state"] == "stopped"


async def test_private_job_needs_owner_token(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    alice, bob = await create_token(daemon.state_dir, "alice"), await create_token(daemon.state_dir, "bob")
    form = aiohttp.FormData()
    form.add_field("mode", "serve")
    form.add_field("private", "true")
    form.add_field("code", tar_gz(APPS / "echo", top="echo"), filename="echo.tar.gz")
    async with client.post(f"{daemon.url}/api/v1/jobs", data=form, headers=bearer(alice)) as response:
        assert response.status == 201
        job = await response.json()
    assert job["private"] is True
    await wait_for_state(client, daemon, job["id"], {"serving"})
    path = f"/expose/{job['id']}/hello"

    status, headers, body = await fetch(daemon, "GET", path)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    status, _, body = await fetch(daemon, "GET", path, bearer(bob))
    assert status == 403
    assert body["error"] == "forbidden"

    for token in (alice, daemon.admin_token):
        status, _, echoed = await fetch(daemon, "GET", path, bearer(token))
        assert status == 200
        assert echoed["path"] == "/hello"
        assert "Authorization" not in [name for name, _ in echoed["headers"]]


async def test_public_job_drops_floydd_token(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    job = await submit_ok(client, daemon, APPS / "echo", mode="serve")
    await wait_for_state(client, daemon, job["id"], {"serving"})
    path = f"/expose/{job['id']}/x"
    status, _, echoed = await fetch(daemon, "GET", path)
    assert status == 200
    status, _, echoed = await fetch(daemon, "GET", path, bearer(daemon.admin_token))
    assert status == 200
    assert "Authorization" not in [name for name, _ in echoed["headers"]]
    status, _, echoed = await fetch(daemon, "GET", path, {"Authorization": "Bearer app-own-token"})
    assert ["Authorization", "Bearer app-own-token"] in echoed["headers"]

    # Dropping the header must not fail on header bytes that are not UTF-8.
    raw = f"GET {path} HTTP/1.1\r\nHost: f\r\nConnection: close\r\nAuthorization: Bearer {daemon.admin_token}\r\n"
    status, _, body = await exchange(daemon, raw.encode() + b"X-Latin: caf\xe9\r\n\r\n")
    assert status == 400
    assert "UTF-8" in json.loads(body)["detail"]


async def test_invalid_private_value_is_400(daemon: Daemon, client: aiohttp.ClientSession) -> None:
    status, body = await submit(client, daemon, tar_gz(APPS / "echo"), mode="serve", private="maybe")
    assert status == 400
    assert "invalid private" in body["detail"]
