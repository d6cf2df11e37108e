"""Tests for floydd.envbuild.

The Docker tests build real images with mmdebstrap, so they need a Docker
engine and access to a Debian mirror. Each python3-minimal build took about
20 s on a 2-core Debian 12 machine.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from floydd.config import EnvBuild, EnvSettings, JobSettings, Settings
from floydd.envbuild import (
    CACHE_DIR_VARIABLE,
    ENV_LABEL,
    PACKAGES_LABEL,
    SPEC_HASH_LABEL,
    SUITE_LABEL,
    EnvBuildError,
    EnvBuildResult,
    build_envs,
    build_spec_hash,
    resolve_suite,
)

TINY_BUILD = EnvBuild(packages=("python3-minimal",))


def make_settings(*envs: EnvSettings) -> Settings:
    return Settings(
        jobs=JobSettings(default_env=envs[0].name),
        envs={env.name: env for env in envs},
    )


def unique_image(kind: str) -> str:
    return f"floydd-test/{kind}-{uuid.uuid4().hex[:12]}:latest"


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(path))
    return path


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def image_cleanup(docker: aiodocker.Docker) -> AsyncIterator[list[str]]:
    """Collect image names to delete when the test ends, whatever its outcome."""
    images: list[str] = []
    yield images
    for image in images:
        try:
            await docker.images.delete(image, force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise


def leftover_entries(cache_dir: Path) -> list[str]:
    return sorted(entry.name for entry in cache_dir.iterdir())


async def import_stub_image(image: str, labels: dict[str, str]) -> None:
    """Import a one-file image with the given labels, much faster than a build."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        content = b"stub\n"
        member = tarfile.TarInfo("stub")
        member.size = len(content)
        archive.addfile(member, io.BytesIO(content))
    label_change = "LABEL " + " ".join(f"{key}={value}" for key, value in labels.items())
    process = await asyncio.create_subprocess_exec(
        "docker",
        "import",
        "--change",
        label_change,
        "-",
        image,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate(buffer.getvalue())
    assert process.returncode == 0, stderr.decode()


async def run_in_image(docker: aiodocker.Docker, image: str, command: list[str]) -> tuple[int, str]:
    """Run a command in a new container and return its exit status and output."""
    container = await docker.containers.run(
        config={"Image": image, "Cmd": command, "NetworkDisabled": True},
    )
    try:
        result: dict[str, Any] = await container.wait(timeout=60)
        output = await container.log(stdout=True, stderr=True)
    finally:
        await container.delete(force=True)
    return int(result["StatusCode"]), "".join(output)


async def test_unknown_env_raises() -> None:
    settings = make_settings(EnvSettings(name="flask", image="floydd/flask:latest", build=EnvBuild()))

    with pytest.raises(EnvBuildError) as excinfo:
        await build_envs(settings, ["no-such-env"])

    assert "'no-such-env'" in str(excinfo.value)
    assert "known: flask" in str(excinfo.value)


def test_spec_hash_ignores_package_order() -> None:
    first = EnvBuild(packages=("python3", "python3-flask"))
    second = EnvBuild(packages=("python3-flask", "python3", "python3"))

    assert build_spec_hash(first, "bookworm") == build_spec_hash(second, "bookworm")


@pytest.mark.parametrize(
    ("build", "suite"),
    [
        (EnvBuild(packages=("python3-minimal", "ca-certificates")), "bookworm"),
        (EnvBuild(packages=("python3-minimal",)), "trixie"),
        (EnvBuild(packages=("python3-minimal",), variant="apt"), "bookworm"),
    ],
)
def test_spec_hash_changes_with_spec(build: EnvBuild, suite: str) -> None:
    assert build_spec_hash(build, suite) != build_spec_hash(TINY_BUILD, "bookworm")


def test_resolve_suite_reads_os_release(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=bookworm\nID=debian\n')

    assert resolve_suite(EnvBuild(), os_release) == "bookworm"
    assert resolve_suite(EnvBuild(suite="trixie"), os_release) == "trixie"


def test_resolve_suite_without_codename_raises(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('NAME="Some Linux"\nID=some\n')

    with pytest.raises(EnvBuildError, match="VERSION_CODENAME"):
        resolve_suite(EnvBuild(), os_release)


@pytest.mark.docker
async def test_build_tiny_env(docker: aiodocker.Docker, image_cleanup: list[str], cache_dir: Path) -> None:
    image = unique_image("envbuild")
    image_cleanup.append(image)
    settings = make_settings(EnvSettings(name="tiny", image=image, build=TINY_BUILD))

    results = await build_envs(settings)

    assert len(results) == 1
    assert results[0].name == "tiny"
    assert results[0].image == image
    assert results[0].outcome == "built"
    assert results[0].seconds > 0

    info = await docker.images.inspect(image)
    config = info["Config"]
    assert config["Labels"][ENV_LABEL] == "tiny"
    assert config["Labels"][SPEC_HASH_LABEL] == build_spec_hash(TINY_BUILD, resolve_suite(TINY_BUILD))
    assert config["Labels"][SUITE_LABEL] == resolve_suite(TINY_BUILD)
    assert config["Labels"][PACKAGES_LABEL] == "python3-minimal"
    assert "LANG=C.UTF-8" in config["Env"]
    assert "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in config["Env"]
    assert config["WorkingDir"] == "/code"
    assert config["Cmd"] == ["python3"]
    assert leftover_entries(cache_dir) == [], "the build directory and tarball were not removed"

    status, output = await run_in_image(docker, image, ["python3", "-c", "print(1)"])
    assert status == 0, output
    assert output.strip() == "1"

    again = await build_envs(settings, ["tiny"])

    assert [result.outcome for result in again] == ["present"]


@pytest.mark.docker
async def test_changed_spec_rebuilds(docker: aiodocker.Docker, image_cleanup: list[str], cache_dir: Path) -> None:
    image = unique_image("envbuild")
    image_cleanup.append(image)
    await import_stub_image(image, {ENV_LABEL: "tiny", SPEC_HASH_LABEL: "stale"})
    stub_id = (await docker.images.inspect(image))["Id"]
    settings = make_settings(EnvSettings(name="tiny", image=image, build=TINY_BUILD))

    results = await build_envs(settings)

    assert [result.outcome for result in results] == ["built"]
    info = await docker.images.inspect(image)
    assert info["Id"] != stub_id
    assert info["Config"]["Labels"][SPEC_HASH_LABEL] == build_spec_hash(TINY_BUILD, resolve_suite(TINY_BUILD))
    with pytest.raises(aiodocker.DockerError) as excinfo:
        await docker.images.inspect(stub_id)
    assert excinfo.value.status == 404, "the replaced image was not removed"


@pytest.mark.docker
async def test_failed_mmdebstrap_raises(docker: aiodocker.Docker, image_cleanup: list[str], cache_dir: Path) -> None:
    image = unique_image("envbuild")
    image_cleanup.append(image)
    build = EnvBuild(packages=("floydd-no-such-package",))
    settings = make_settings(EnvSettings(name="broken", image=image, build=build))

    with pytest.raises(EnvBuildError) as excinfo:
        await build_envs(settings)

    message = str(excinfo.value)
    assert "mmdebstrap for environment 'broken' failed" in message
    assert "floydd-no-such-package" in message
    assert leftover_entries(cache_dir) == [], "the build directory was not removed"
    with pytest.raises(aiodocker.DockerError):
        await docker.images.inspect(image)


@pytest.mark.docker
async def test_unbuildable_env_missing_image(cache_dir: Path) -> None:
    image = unique_image("absent")
    settings = make_settings(EnvSettings(name="external", image=image))

    results = await build_envs(settings)

    assert results == [EnvBuildResult("external", image, "not_buildable", results[0].seconds)]

    with pytest.raises(EnvBuildError) as excinfo:
        await build_envs(settings, ["external"])

    assert image in str(excinfo.value)
    assert "pull the image" in str(excinfo.value)


@pytest.mark.docker
async def test_unbuildable_env_present_image(image_cleanup: list[str], cache_dir: Path) -> None:
    image = unique_image("external")
    image_cleanup.append(image)
    await import_stub_image(image, {ENV_LABEL: "external"})
    settings = make_settings(EnvSettings(name="external", image=image))

    results = await build_envs(settings, ["external"])

    assert [result.outcome for result in results] == ["not_buildable"]
