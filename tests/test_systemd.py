"""systemd: the unit file, sd_notify, journal logging, and floydd as a real systemd service.

The last test boots systemd in a container (see `systemd_machine`), installs
floydd there with scripts/install.sh and drives it with systemctl, while the
job containers run on the host's Docker engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import pytest

from floydd.config import EnvBuild, EnvSettings, Settings
from floydd.envbuild import build_envs
from floydd.log import stderr_is_journal
from floydd.runtime import LABEL_INSTANCE
from floydd.systemd import notify, notify_address
from tests.conftest import APPS, REPO, start_daemon, tar_gz

UNIT = REPO / "systemd" / "floydd.service"
INSTALLED_COMMAND = "/opt/floydd/venv/bin/floydd"

# The systemd container's image, built with mmdebstrap like floydd's env
# images. docker.io is in it only because scripts/install.sh installs it when
# dockerd is missing. Its units are masked at boot (see MASKED_UNITS).
SYSTEMD_IMAGE = EnvSettings(
    name="systemd-test",
    image="floydd-test/systemd:latest",
    description="Debian with systemd as PID 1, for testing floydd's unit",
    build=EnvBuild(
        packages=(
            "systemd",
            "systemd-sysv",
            "python3",
            "python3-venv",
            "docker.io",
            "mmdebstrap",
            "ca-certificates",
        )
    ),
)
# A dockerd inside the systemd container would set up bridges and iptables
# rules in the network namespace it shares with the host's engine, so it must
# never start there.
MASKED_UNITS = ("docker.service", "docker.socket", "containerd.service")
SOURCE_IN_MACHINE = "/opt/floydd-source"
WHEELS_IN_MACHINE = "/opt/floydd-wheels"


# --- the unit file -----------------------------------------------------------


def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing; run scripts/bootstrap.sh, which installs the systemd package")
    # verify checks that ExecStart's command exists, so the copy names this
    # checkout's floydd instead of the installed one.
    text = UNIT.read_text()
    assert text.count(INSTALLED_COMMAND) == 1
    local_command = Path(sys.executable).parent / "floydd"
    unit = tmp_path / "floydd.service"
    unit.write_text(text.replace(INSTALLED_COMMAND, str(local_command)))

    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )

    # verify exits 0 after warnings such as "Unknown key", so any output fails.
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == ""


def test_unit_settings() -> None:
    settings = _unit_settings(UNIT.read_text())
    grace_s = Settings().server.shutdown_grace_s

    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["KillMode"] == "mixed"
    assert float(settings["TimeoutStopSec"]) > grace_s
    assert settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"] == "floydd"


def _unit_settings(text: str) -> dict[str, str]:
    settings = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


# --- sd_notify ---------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the role of systemd's notification socket."""
    # A short directory, because a Unix socket path has at most 107 bytes.
    directory = tempfile.mkdtemp(prefix="floydd-notify-")
    path = os.path.join(directory, "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(10)
    try:
        yield receiver, path
    finally:
        receiver.close()
        shutil.rmtree(directory)


def test_notify_sends_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    receiver, path = notify_socket

    sent = notify("READY=1", "STATUS=listening", environ={"NOTIFY_SOCKET": path})

    assert sent
    assert receiver.recv(4096) == b"READY=1\nSTATUS=listening"


def test_notify_abstract_socket() -> None:
    name = f"floydd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(10)

        sent = notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})

        assert sent
        assert receiver.recv(4096) == b"STOPPING=1"


def test_notify_without_socket() -> None:
    assert not notify("READY=1", environ={})


def test_notify_missing_socket_file(tmp_path: Path) -> None:
    assert not notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/notify"])
def test_notify_address_unsupported(value: str) -> None:
    assert notify_address(value) is None


# --- journal logging ---------------------------------------------------------

_LOG_SCRIPT = """
import sys
import structlog
from floydd.log import configure_logging
configure_logging(json={json})
log = structlog.get_logger("floydd.test")
log.info("job_started", job_id="abc")
log.warning("disk_low", free_bytes=1)
try:
    1 / 0
except ZeroDivisionError:
    log.exception("job_crashed", job_id="abc")
"""


def _log_lines(tmp_path: Path, *, journal: bool, json_format: str = "None") -> list[str]:
    """Run the logging set-up in a child whose stderr is a file, as the journal would see it."""
    output = tmp_path / "stderr"
    with output.open("wb") as stream:
        stat = os.fstat(stream.fileno())
        environ = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
        # A device:inode pair that is not stderr's stands for an inherited variable.
        environ["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}" if journal else f"{stat.st_dev}:1"
        subprocess.run(
            [sys.executable, "-c", _LOG_SCRIPT.format(json=json_format)],
            stderr=stream,
            env=environ,
            cwd=REPO,
            timeout=60,
            check=True,
        )
    return output.read_text().splitlines()


def test_journal_lines_carry_priority(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, journal=True)

    assert lines[0].startswith("<6>")
    assert "job_started" in lines[0]
    assert lines[1].startswith("<4>")
    assert "disk_low" in lines[1]
    assert all(line.startswith("<3>") for line in lines[2:])
    assert any("ZeroDivisionError" in line for line in lines[2:])


def test_journal_lines_plain(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, journal=True)

    assert not any("\x1b[" in line for line in lines)
    # journald stamps each entry itself.
    assert not any(re.search(r"\d{4}-\d\d-\d\dT?\s?\d\d:\d\d", line) for line in lines)
    assert "job_id=abc" in lines[0]


def test_journal_json_on_request(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, journal=True, json_format="True")

    assert lines[0].startswith("<6>{")
    event = json.loads(lines[0].removeprefix("<6>"))
    assert event["event"] == "job_started"
    assert "timestamp" in event


def test_inherited_journal_variable_ignored(tmp_path: Path) -> None:
    lines = _log_lines(tmp_path, journal=False)

    event = json.loads(lines[0])
    assert event["event"] == "job_started"


def test_stderr_is_journal_without_variable() -> None:
    assert not stderr_is_journal({})


# --- the daemon's notifications ----------------------------------------------


@pytest.mark.docker
async def test_daemon_notifies_ready_and_stopping(
    tmp_path: Path, docker_engine: None, notify_socket: tuple[socket.socket, str]
) -> None:
    receiver, path = notify_socket
    receiver.setblocking(False)
    loop = asyncio.get_running_loop()

    daemon = await start_daemon(tmp_path / "state", env={"NOTIFY_SOCKET": path})
    try:
        async with asyncio.timeout(30):
            starting = await loop.sock_recv(receiver, 4096)
            ready = await loop.sock_recv(receiver, 4096)
        assert starting.startswith(b"STATUS=")
        assert ready.split(b"\n") == [b"READY=1", f"STATUS=listening on {daemon.url}".encode()]
        assert daemon.logged("floydd_listening")
    finally:
        code = await daemon.stop()

    async with asyncio.timeout(30):
        stopping = await loop.sock_recv(receiver, 4096)
    assert code == 0
    assert stopping.split(b"\n")[0] == b"STOPPING=1"


# --- floydd under a real systemd ---------------------------------------------


@pytest.fixture(scope="session")
def systemd_image(docker_engine: None) -> str:
    """Build the image once; envbuild skips it while its packages are unchanged."""
    started = time.monotonic()
    settings = Settings(envs={SYSTEMD_IMAGE.name: SYSTEMD_IMAGE})
    [result] = asyncio.run(build_envs(settings, [SYSTEMD_IMAGE.name]))
    print(f"systemd image {result.image}: {result.outcome} in {time.monotonic() - started:.1f} s")
    return result.image


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of floydd's dependencies, built with the host's pip and its package index set-up.

    pip inside the systemd container then installs with --no-index from this
    folder, so the test works on a host whose pip reaches only a local mirror
    and does not depend on PyPI being reachable from the container.
    """
    folder = tmp_path_factory.mktemp("wheels")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    requirements = [*project["project"]["dependencies"], *project["build-system"]["requires"], "wheel"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder), *requirements],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stderr[-3000:]}"
    return folder


@dataclass
class SystemdMachine:
    """A container with systemd as PID 1 that shares the host's network and Docker engine."""

    name: str
    # Same path on the host and in the container, because the host's engine
    # resolves the bind mounts of job code that floydd requests.
    state_dir: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *command: str, timeout_s: float = 120, check: bool = True) -> str:
        """Run a command in the machine and return its stdout; fail with its output when it fails."""
        code, stdout, stderr = await _docker("exec", self.name, *command, timeout_s=timeout_s)
        if check and code != 0:
            journal = await self.journal() if command[:1] == ("systemctl",) else ""
            pytest.fail(f"{' '.join(command)} exited {code}:\n{stdout}\n{stderr}\nfloydd's journal:\n{journal}")
        return stdout

    async def journal(self) -> str:
        _, stdout, stderr = await _docker(
            "exec", self.name, "journalctl", "--no-pager", "-u", "floydd", "-o", "cat", "-n", "60", timeout_s=30
        )
        return stdout + stderr

    async def unit_properties(self, *names: str) -> dict[str, str]:
        stdout = await self.run("systemctl", "show", "floydd", *(f"--property={name}" for name in names))
        return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


async def _docker(*args: str, timeout_s: float) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"docker {' '.join(args)} did not finish within {timeout_s} s")
    assert process.returncode is not None
    return process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def systemd_machine(systemd_image: str, wheelhouse: Path) -> AsyncIterator[SystemdMachine]:
    """Boot systemd in a container and install floydd there with scripts/install.sh.

    `--network host` puts floydd in the host's network namespace, so the
    127.0.0.1 ports that the host's engine publishes for jobs are the ones
    floydd connects to, and the test reaches floydd on 127.0.0.1 too.
    """
    token = secrets.token_hex(6)
    # Outside /tmp and /var/tmp, because the unit's PrivateTmp= hides those.
    state_dir = Path(tempfile.mkdtemp(prefix=f"floydd-systemd-test-{token}-", dir="/var/lib"))
    machine = SystemdMachine(name=f"floydd-systemd-test-{token}", state_dir=state_dir, port=_free_port())
    mask = "; ".join(f"ln -sf /dev/null /etc/systemd/system/{unit}" for unit in MASKED_UNITS)
    try:
        code, _, stderr = await _docker(
            "run", "--detach", "--name", machine.name,
            "--label", "org.floydd.test=systemd",
            "--network", "host",
            "--cap-add", "SYS_ADMIN",
            "--cgroupns", "host",
            "--volume", "/sys/fs/cgroup:/sys/fs/cgroup",
            "--tmpfs", "/run", "--tmpfs", "/run/lock",
            "--volume", "/var/run/docker.sock:/run/docker.sock",
            "--volume", f"{REPO}:{SOURCE_IN_MACHINE}:ro",
            "--volume", f"{wheelhouse}:{WHEELS_IN_MACHINE}:ro",
            "--volume", f"{state_dir}:{state_dir}",
            "--env", "container=docker",
            "--stop-signal", "SIGRTMIN+3",
            "--entrypoint", "/bin/sh",
            systemd_image, "-c", f"{mask}; exec /sbin/init",
            timeout_s=60,
        )  # fmt: skip
        assert code == 0, f"docker run of the systemd container failed: {stderr}"
        await _wait_for_boot(machine)
        yield machine
    finally:
        await _docker("rm", "--force", "--volumes", machine.name, timeout_s=60)
        await _remove_job_containers(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


async def _wait_for_boot(machine: SystemdMachine, timeout_s: float = 90) -> None:
    # systemctl fails until systemd has created its private socket, so it is
    # retried. "degraded" means that a unit failed, which the test does not
    # need, so it counts as booted.
    deadline = time.monotonic() + timeout_s
    while True:
        code, stdout, stderr = await _docker(
            "exec", machine.name, "systemctl", "is-system-running", "--wait", timeout_s=timeout_s
        )
        if stdout.strip() in ("running", "degraded"):
            return
        if time.monotonic() > deadline:
            _, logs, _ = await _docker("logs", "--tail", "40", machine.name, timeout_s=30)
            pytest.fail(f"systemd did not boot in {timeout_s} s: {stdout.strip()!r} {stderr.strip()!r}\n{logs}")
        await asyncio.sleep(0.5)


async def _remove_job_containers(state_dir: Path) -> None:
    try:
        instance = (state_dir / "instance-id").read_text().strip()
    except FileNotFoundError:
        return
    async with aiodocker.Docker() as docker:
        containers = await docker.containers.list(all=True, filters={"label": [f"{LABEL_INSTANCE}={instance}"]})
        for container in containers:
            await container.delete(force=True)


async def _install_floydd(machine: SystemdMachine) -> None:
    await machine.run(
        "env", "PIP_NO_INDEX=1", f"PIP_FIND_LINKS={WHEELS_IN_MACHINE}",
        "bash", f"{SOURCE_IN_MACHINE}/scripts/install.sh",
        timeout_s=300,
    )  # fmt: skip
    # A drop-in, as an operator would write one with `systemctl edit floydd`.
    drop_in = (
        "[Service]\n"
        f"Environment=FLOYDD_SERVER_STATE_DIR={machine.state_dir} FLOYDD_SERVER_PORT={machine.port}\n"
        f"ReadWritePaths={machine.state_dir}\n"
    )
    directory = "/etc/systemd/system/floydd.service.d"
    await machine.run("sh", "-c", f'mkdir -p {directory} && printf %s "$1" > {directory}/test.conf', "sh", drop_in)
    await machine.run("systemctl", "daemon-reload")


async def _create_admin_token(machine: SystemdMachine) -> str:
    """Create an admin token in the machine's state dir, as an operator would after installing."""
    stdout = await machine.run(
        "/opt/floydd/venv/bin/floydd", "token", "create", "admin", "--admin",
        "--config", "/etc/floydd/floydd.toml", "--state-dir", str(machine.state_dir),
    )  # fmt: skip
    return stdout.strip()


async def _listening_addresses(machine: SystemdMachine) -> list[str]:
    """Return the local addresses of floydd's listening TCP sockets, read from /proc in the machine."""
    [pid] = (await machine.unit_properties("MainPID")).values()
    script = f"""
import os
inodes = set()
for fd in os.listdir("/proc/{pid}/fd"):
    target = os.readlink(f"/proc/{pid}/fd/{{fd}}")
    if target.startswith("socket:["):
        inodes.add(target[8:-1])
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for row in open(table).read().splitlines()[1:]:
        fields = row.split()
        if fields[3] == "0A" and fields[9] in inodes:
            print(fields[1])
"""
    stdout = await machine.run("/opt/floydd/venv/bin/python", "-c", script)
    return stdout.split()


async def _submit_echo(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("mode", "serve")
    form.add_field("code", tar_gz(APPS / "echo", top="echo"), filename="echo.tar.gz", content_type="application/gzip")
    async with client.post(f"{url}/api/v1/jobs", data=form) as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 201, body
        return body


async def _wait_serving(client: aiohttp.ClientSession, url: str, job_id: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        async with client.get(f"{url}/api/v1/jobs/{job_id}") as response:
            job = await response.json()
        if job["state"] == "serving":
            return
        if job["state"] not in ("queued", "starting"):
            pytest.fail(f"job ended {job['state']} ({job.get('reason')}) instead of serving")
        if time.monotonic() > deadline:
            pytest.fail(f"job still {job['state']} after {timeout_s} s")
        await asyncio.sleep(0.3)


async def _call_job(client: aiohttp.ClientSession, url: str, job_id: str, probe: str) -> dict[str, Any]:
    async with client.get(f"{url}/expose/{job_id}/{probe}") as response:
        body: dict[str, Any] = await response.json()
        assert response.status == 200, body
        return body


async def _inspect_job_container(job_id: str) -> dict[str, Any]:
    async with aiodocker.Docker() as docker:
        info: dict[str, Any] = await docker.containers.container(f"floydd-{job_id}").show()
        return info


async def _container_logs(container_id: str) -> str:
    async with aiodocker.Docker() as docker:
        lines = await docker.containers.container(container_id).log(stdout=True, stderr=True)
        return "".join(lines)


@pytest.mark.docker
async def test_systemctl_stop_keeps_job(systemd_machine: SystemdMachine) -> None:
    machine = systemd_machine
    timings: dict[str, float] = {}
    started = time.monotonic()
    await _install_floydd(machine)
    timings["install"] = time.monotonic() - started
    token = await _create_admin_token(machine)

    started = time.monotonic()
    await machine.run("systemctl", "start", "floydd", timeout_s=120)
    timings["first start"] = time.monotonic() - started
    unit = await machine.unit_properties("ActiveState", "Type", "StatusText")
    assert unit["ActiveState"] == "active"
    assert unit["Type"] == "notify"
    assert unit["StatusText"] == f"listening on {machine.url}"
    listening = await _listening_addresses(machine)
    assert listening == [f"0100007F:{machine.port:04X}"]

    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), headers=headers) as client:
        job = await _submit_echo(client, machine.url)
        await _wait_serving(client, machine.url, job["id"])
        first = await _call_job(client, machine.url, job["id"], "before-stop")
        assert first["path"] == "/before-stop"
        before = await _inspect_job_container(job["id"])
        bindings = before["HostConfig"]["PortBindings"]["5000/tcp"]
        assert [binding["HostIp"] for binding in bindings] == ["127.0.0.1"]

        started = time.monotonic()
        await machine.run("systemctl", "stop", "floydd", timeout_s=120)
        timings["stop"] = time.monotonic() - started
        stopped = await machine.unit_properties("ActiveState", "Result")
        assert stopped["ActiveState"] == "inactive"
        assert stopped["Result"] == "success"
        during = await _inspect_job_container(job["id"])
        assert during["Id"] == before["Id"]
        assert during["State"]["Running"]

        started = time.monotonic()
        await machine.run("systemctl", "start", "floydd", timeout_s=120)
        timings["second start"] = time.monotonic() - started
        await _wait_serving(client, machine.url, job["id"])
        second = await _call_job(client, machine.url, job["id"], "after-restart")
        assert second["path"] == "/after-restart"

    after = await _inspect_job_container(job["id"])
    assert after["Id"] == before["Id"]
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
    # Flask's request log shows which container served the second call.
    assert "/after-restart" in await _container_logs(before["Id"])
    print("systemd test timings: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items()))


@pytest.mark.docker
async def test_journal_entries_readable(systemd_machine: SystemdMachine) -> None:
    machine = systemd_machine
    await _install_floydd(machine)
    await machine.run("systemctl", "start", "floydd", timeout_s=120)
    await machine.run("systemctl", "stop", "floydd", timeout_s=120)

    stdout = await machine.run("journalctl", "--no-pager", "-u", "floydd", "_COMM=floydd", "-o", "json")
    entries = [json.loads(line) for line in stdout.splitlines()]
    messages = {entry["MESSAGE"]: entry["PRIORITY"] for entry in entries}
    listening = [message for message in messages if "floydd_listening" in message]

    assert len(listening) == 1
    assert messages[listening[0]] == "6"
    assert not listening[0].startswith("<")
    assert not listening[0].startswith("{")
    assert f"port={machine.port}" in listening[0]
    assert any("floydd_stopping" in message for message in messages)
