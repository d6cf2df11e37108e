"""Datasets, job outputs, deletion and retention against a real daemon and Docker engine."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest

from tests.conftest import (
    Daemon,
    create_token,
    get_logs,
    remove_job_containers,
    running_daemon,
    start_daemon,
    submit_ok,
    tar_gz,
    wait_for_state,
)

pytestmark = pytest.mark.docker


async def upload_dataset(
    client: aiohttp.ClientSession,
    daemon: Daemon,
    name: str,
    folder: Path,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("name", name)
    form.add_field("data", tar_gz(folder), filename="data.tar.gz", content_type="application/gzip")
    async with client.post(f"{daemon.url}/api/v1/datasets", data=form, headers=headers) as response:
        return response.status, await response.json()


async def submit_with_data(
    client: aiohttp.ClientSession, daemon: Daemon, project: Path, command: str, data: list[str], **fields: str
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("command", command)
    for value in data:
        form.add_field("data", value)
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("code", tar_gz(project), filename="project.tar.gz", content_type="application/gzip")
    async with client.post(f"{daemon.url}/api/v1/jobs", data=form) as response:
        return response.status, await response.json()


def folder_with(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for relative, text in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(text)
    return folder


async def test_dataset_read_by_job_output_downloaded(
    daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    numbers = folder_with(tmp_path, "d", {"n.txt": "1\n2\n3\n"})
    status, dataset = await upload_dataset(client, daemon, "numbers", numbers)
    project = folder_with(
        tmp_path,
        "p",
        {
            "run.sh": "wc -l < /input/n.txt > /output/count.txt\n"
            "if touch /input/new 2>/dev/null; then echo writable; else echo read-only; fi > /output/mode.txt\n"
            "mkdir -p /output/sub && cp /input/n.txt /output/sub/copy.txt\n"
        },
    )
    created_status, job = await submit_with_data(client, daemon, project, "sh run.sh", ["numbers:input"])
    assert created_status == 201, job
    await wait_for_state(client, daemon, job["id"], {"succeeded"}, timeout_s=60)

    async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}/output") as response:
        archive_status = response.status
        archive = await response.read()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as bundle:
        members = {member.name: bundle.extractfile(member) for member in bundle.getmembers() if member.isfile()}
        contents = {name: handle.read().decode() for name, handle in members.items() if handle is not None}
    async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}/output", params={"path": "count.txt"}) as response:
        single_status = response.status
        single = await response.text()

    assert status == 201
    assert dataset["id"] == "numbers/1"
    assert job["data"] == [{"dataset": "numbers/1", "mount": "/input"}]
    assert archive_status == 200
    assert contents == {"count.txt": "3\n", "mode.txt": "read-only\n", "sub/copy.txt": "1\n2\n3\n"}
    assert single_status == 200
    assert single == "3\n"


async def test_output_path_cannot_escape(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    project = folder_with(tmp_path, "p", {"run.sh": "ln -s /etc/passwd /output/link\necho ok > /output/ok.txt\n"})
    job = await submit_ok(client, daemon, project, command="sh run.sh")
    await wait_for_state(client, daemon, job["id"], {"succeeded"}, timeout_s=60)
    url = f"{daemon.url}/api/v1/jobs/{job['id']}/output"

    statuses = {}
    for path in ("../logs.txt", "/etc/passwd", "link", "missing.txt", "ok.txt"):
        async with client.get(url, params={"path": path}) as response:
            statuses[path] = response.status

    assert statuses["../logs.txt"] == 400
    assert statuses["/etc/passwd"] == 400
    assert statuses["link"] == 404
    assert statuses["missing.txt"] == 404
    assert statuses["ok.txt"] == 200


async def test_dataset_versions_and_delete(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    first = await upload_dataset(client, daemon, "corpus", folder_with(tmp_path, "a", {"v.txt": "one\n"}))
    second = await upload_dataset(client, daemon, "corpus", folder_with(tmp_path, "b", {"v.txt": "two\n"}))
    async with client.delete(f"{daemon.url}/api/v1/datasets/corpus/2") as response:
        deleted = response.status
    third = await upload_dataset(client, daemon, "corpus", folder_with(tmp_path, "c", {"v.txt": "three\n"}))
    async with client.get(f"{daemon.url}/api/v1/datasets") as response:
        listing = await response.json()
    async with client.get(f"{daemon.url}/api/v1/datasets/corpus/2") as response:
        gone = response.status

    assert first[1]["id"] == "corpus/1"
    assert second[1]["id"] == "corpus/2"
    assert deleted == 200
    assert third[1]["id"] == "corpus/3"
    assert [item["id"] for item in listing["datasets"]] == ["corpus/1", "corpus/3"]
    assert gone == 404


async def test_dataset_in_use_not_deleted(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    await upload_dataset(client, daemon, "busy", folder_with(tmp_path, "d", {"x.txt": "x\n"}))
    project = folder_with(tmp_path, "p", {"run.sh": "sleep 300\n"})
    status, job = await submit_with_data(client, daemon, project, "sh run.sh", ["busy/1:data"])
    assert status == 201, job
    await wait_for_state(client, daemon, job["id"], {"running"})
    async with client.delete(f"{daemon.url}/api/v1/datasets/busy/1") as response:
        refused = response.status
        body = await response.json()

    assert refused == 409
    assert body["error"] == "dataset_in_use"
    assert job["id"] in body["detail"]


async def test_previous_output_mounted(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    first_project = folder_with(tmp_path, "p1", {"run.sh": "echo weights > /output/model.bin\n"})
    first = await submit_ok(client, daemon, first_project, command="sh run.sh")
    await wait_for_state(client, daemon, first["id"], {"succeeded"}, timeout_s=60)
    second_project = folder_with(tmp_path, "p2", {"run.sh": "cat /prev/model.bin\n"})
    status, second = await submit_with_data(client, daemon, second_project, "sh run.sh", [f"jobs/{first['id']}:prev"])
    assert status == 201, second
    await wait_for_state(client, daemon, second["id"], {"succeeded"}, timeout_s=60)

    assert await get_logs(client, daemon, second["id"]) == "weights\n"


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (["nosuch:input"], "no dataset named 'nosuch'"),
        (["nums:code"], "invalid mount"),
        (["nums:../etc"], "invalid mount"),
        (["nums:a", "nums:a"], "used twice"),
        ([f"nums:m{index}" for index in range(6)], "at most 5"),
        (["jobs/unknown:prev"], "no job 'unknown'"),
    ],
)
async def test_invalid_data_rejected(
    daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path, data: list[str], fragment: str
) -> None:
    await upload_dataset(client, daemon, "nums", folder_with(tmp_path, "d", {"n.txt": "1\n"}))
    project = folder_with(tmp_path, "p", {"run.sh": "true\n"})
    status, body = await submit_with_data(client, daemon, project, "sh run.sh", data)

    assert status in (400, 404)
    assert fragment in body["detail"]
    assert not list((daemon.state_dir / "jobs").glob("*"))


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"gpu": "1"}, "this host has no GPUs"),
        ({"memory": "1000g"}, "exceeds the limit"),
        ({"memory": "lots"}, "invalid memory"),
        ({"cpus": "500"}, "must be between"),
    ],
)
async def test_invalid_requests_rejected(
    daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path, fields: dict[str, str], fragment: str
) -> None:
    project = folder_with(tmp_path, "p", {"run.sh": "true\n"})
    status, body = await submit_with_data(client, daemon, project, "sh run.sh", [], **fields)

    assert status == 400
    assert fragment in body["detail"]


async def test_cpus_capped_at_host(tmp_path: Path, docker_engine: None, client: aiohttp.ClientSession) -> None:
    """Caps above the host's CPU count: a request over the host is rejected, and the default is cut to the host."""
    async with aiodocker.Docker() as docker:
        host_cpus = int((await docker.system.info())["NCPU"])
    env = {"FLOYDD_RESOURCES_MAX_CPUS": "4096", "FLOYDD_RESOURCES_DEFAULT_CPUS": "4096"}
    async with running_daemon(tmp_path, env=env) as daemon:
        project = folder_with(tmp_path, "p", {"run.sh": "sleep 300\n"})
        status, rejected = await submit_with_data(client, daemon, project, "sh run.sh", [], cpus=str(host_cpus + 1))
        job = await submit_ok(client, daemon, project, command="sh run.sh")
        await wait_for_state(client, daemon, job["id"], {"running"})
        async with aiodocker.Docker() as docker:
            info = await docker.containers.container(f"floydd-{job['id']}").show()

    assert status == 400
    assert rejected["detail"] == f"cpus '{host_cpus + 1}' is more than this host's {host_cpus} CPUs"
    assert info["HostConfig"]["NanoCpus"] == host_cpus * 10**9


async def test_delete_job_removes_everything(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    project = folder_with(tmp_path, "p", {"run.sh": "echo done > /output/r.txt\n"})
    running_project = folder_with(tmp_path, "q", {"run.sh": "sleep 300\n"})
    job = await submit_ok(client, daemon, project, command="sh run.sh")
    running = await submit_ok(client, daemon, running_project, command="sh run.sh")
    await wait_for_state(client, daemon, job["id"], {"succeeded"}, timeout_s=60)
    await wait_for_state(client, daemon, running["id"], {"running"})

    async with client.delete(f"{daemon.url}/api/v1/jobs/{job['id']}") as response:
        deleted = response.status
    async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}") as response:
        after = response.status
    async with client.delete(f"{daemon.url}/api/v1/jobs/{running['id']}") as response:
        refused = response.status
    async with client.get(f"{daemon.url}/api/v1/jobs/{running['id']}/output") as response:
        output_while_running = response.status

    assert deleted == 200
    assert after == 404
    assert not (daemon.state_dir / "jobs" / job["id"]).exists()
    assert refused == 409
    assert output_while_running == 409
    assert output_while_running == 409


async def test_retention_prunes_files(tmp_path: Path, client: aiohttp.ClientSession, docker_engine: None) -> None:
    env = {"FLOYDD_LIFECYCLE_RETENTION_S": "1", "FLOYDD_LIFECYCLE_PRUNE_INTERVAL_S": "0.5"}
    daemon = await start_daemon(tmp_path / "state", env=env)
    try:
        project = folder_with(tmp_path, "p", {"run.sh": "echo kept > /output/r.txt\n"})
        job = await submit_ok(client, daemon, project, command="sh run.sh")
        await wait_for_state(client, daemon, job["id"], {"succeeded"}, timeout_s=60)
        for _ in range(50):
            if not (daemon.state_dir / "jobs" / job["id"]).exists():
                break
            await asyncio.sleep(0.2)
        async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}") as response:
            record = response.status
        async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}/output") as response:
            output = response.status
            body = await response.json()
    finally:
        await daemon.stop()
        await remove_job_containers(daemon)

    assert not (daemon.state_dir / "jobs" / job["id"]).exists()
    assert record == 200
    assert output == 404
    assert "pruned" in body["detail"]


async def test_other_users_data_hidden(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    await upload_dataset(client, daemon, "secret", folder_with(tmp_path, "d", {"s.txt": "s\n"}))
    job = await submit_ok(client, daemon, folder_with(tmp_path, "p", {"run.sh": "true\n"}), command="sh run.sh")
    await wait_for_state(client, daemon, job["id"], {"succeeded"}, timeout_s=60)
    alice = {"Authorization": f"Bearer {await create_token(daemon.state_dir, 'alice')}"}

    async with client.get(f"{daemon.url}/api/v1/datasets", headers=alice) as response:
        listing = await response.json()
    async with client.get(f"{daemon.url}/api/v1/datasets/secret", headers=alice) as response:
        shown = response.status
    async with client.delete(f"{daemon.url}/api/v1/datasets/secret/1", headers=alice) as response:
        deleted = response.status
    async with client.get(f"{daemon.url}/api/v1/jobs/{job['id']}/output", headers=alice) as response:
        output = response.status
    async with client.delete(f"{daemon.url}/api/v1/jobs/{job['id']}", headers=alice) as response:
        job_deleted = response.status
    form = aiohttp.FormData()
    form.add_field("command", "true")
    form.add_field("data", "secret:input")
    form.add_field("data", f"jobs/{job['id']}:prev")
    form.add_field("code", tar_gz(tmp_path / "p"), filename="p.tar.gz", content_type="application/gzip")
    async with client.post(f"{daemon.url}/api/v1/jobs", data=form, headers=alice) as response:
        mounted = response.status
        body = await response.json()

    assert listing == {"datasets": []}
    assert shown == 404
    assert deleted == 404
    assert output == 404
    assert job_deleted == 404
    assert mounted == 404
    assert "no dataset named 'secret'" in body["detail"]


async def test_dataset_name_stays_with_owner(daemon: Daemon, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    alice = {"Authorization": f"Bearer {await create_token(daemon.state_dir, 'alice')}"}
    bob = {"Authorization": f"Bearer {await create_token(daemon.state_dir, 'bob')}"}
    folder = folder_with(tmp_path, "d", {"n.txt": "1\n"})
    created, _ = await upload_dataset(client, daemon, "shared", folder, alice)
    other_user, other_user_body = await upload_dataset(client, daemon, "shared", folder, bob)
    async with client.delete(f"{daemon.url}/api/v1/datasets/shared/1", headers=alice) as response:
        deleted = response.status
    other_user_after_delete, _ = await upload_dataset(client, daemon, "shared", folder, bob)
    again, again_body = await upload_dataset(client, daemon, "shared", folder, alice)

    assert created == 201
    assert other_user == 409
    assert other_user_body["error"] == "dataset_name_taken"
    assert deleted == 200
    assert other_user_after_delete == 409
    assert again == 201
    assert again_body["version"] == 2
