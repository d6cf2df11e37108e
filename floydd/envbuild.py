"""Build environment images offline from Debian packages.

An environment with a `build` table in the settings is built with mmdebstrap
into a root filesystem tarball, which `docker import` turns into a one-layer
image. The image carries a label with a SHA-256 hash of the build spec, so a
changed package list, suite or variant is detected and the image rebuilt.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiodocker
import structlog

from floydd.config import DockerSettings, EnvBuild, EnvSettings, Settings

log = structlog.get_logger(__name__)

ENV_LABEL = "org.floydd.env"
SPEC_HASH_LABEL = "org.floydd.env.spec-sha256"
SUITE_LABEL = "org.floydd.env.suite"
PACKAGES_LABEL = "org.floydd.env.packages"

DEFAULT_CACHE_DIR = "/var/cache/floydd"
CACHE_DIR_VARIABLE = "FLOYDD_CACHE_DIR"

# Dockerfile instructions applied on import, because an imported root
# filesystem has no image config. The engine would supply a default PATH, but
# setting it here keeps it visible in `docker inspect` and independent of the
# engine. They are part of the spec hash, so changing them rebuilds images.
IMAGE_CHANGES = (
    "ENV LANG=C.UTF-8",
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "WORKDIR /code",
    'CMD ["python3"]',
)

# Bumped when the way an image is produced changes in a way the fields of the
# spec do not show, so that existing images are rebuilt.
SPEC_FORMAT = 1

_STDERR_TAIL_LINES = 20
_TERMINATE_GRACE_S = 30.0

Outcome = Literal["built", "present", "not_buildable"]


class EnvBuildError(Exception):
    """An environment that cannot be built or checked."""


@dataclass(frozen=True)
class EnvBuildResult:
    name: str
    image: str
    outcome: Outcome
    # Wall-clock time spent on this environment, build included.
    seconds: float


async def build_envs(
    settings: Settings,
    names: Sequence[str] | None = None,
    *,
    force: bool = False,
) -> list[EnvBuildResult]:
    """Build the images of the named environments (all when `names` is None).

    An image that exists with the current spec hash is left alone unless
    `force` is set. An environment without a `build` table is reported as
    `not_buildable`. If it was named explicitly and its image is missing,
    `EnvBuildError` is raised instead, because nothing here can make it.
    """
    envs = _select_envs(settings.envs, names)
    explicit = names is not None
    cache_dir = _cache_dir()
    results = []
    async with _connect(settings.docker.url) as docker:
        for env in envs:
            started = time.monotonic()
            if env.build is None:
                outcome = await _check_unbuildable(docker, env, explicit, settings.docker)
            else:
                outcome = await _ensure_built(
                    docker, env, env.build, force=force, cache_dir=cache_dir, docker_settings=settings.docker
                )
            results.append(EnvBuildResult(env.name, env.image, outcome, time.monotonic() - started))
    return results


def build_spec_hash(build: EnvBuild, suite: str) -> str:
    """Return the SHA-256 hex digest of what determines an image's content.

    `suite` is the resolved suite name. Package order and duplicates do not
    change the hash, because they do not change what mmdebstrap installs.
    """
    spec = {
        "format": SPEC_FORMAT,
        "suite": suite,
        "variant": build.variant,
        "packages": sorted(set(build.packages)),
        "changes": list(IMAGE_CHANGES),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def resolve_suite(build: EnvBuild, os_release: Path = Path("/etc/os-release")) -> str:
    """Return the build's suite, or the host's VERSION_CODENAME when it is empty."""
    if build.suite:
        return build.suite
    try:
        text = os_release.read_text(encoding="utf-8")
    except OSError as exc:
        raise EnvBuildError(
            f"cannot read {os_release} to find the host's release ({exc.strerror}); "
            "set suite in the [envs.NAME.build] table"
        ) from exc
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "VERSION_CODENAME" and value.strip().strip("\"'"):
            return value.strip().strip("\"'")
    raise EnvBuildError(f"no VERSION_CODENAME in {os_release}; set suite in the [envs.NAME.build] table")


def _host_codename() -> str:
    try:
        return resolve_suite(EnvBuild(suite=""))
    except EnvBuildError:
        return ""


def _select_envs(envs: Mapping[str, EnvSettings], names: Sequence[str] | None) -> list[EnvSettings]:
    if names is None:
        return list(envs.values())
    unknown = [name for name in names if name not in envs]
    if unknown:
        raise EnvBuildError(
            f"unknown environment {', '.join(repr(name) for name in unknown)}; known: {', '.join(envs) or 'none'}"
        )
    return [envs[name] for name in dict.fromkeys(names)]


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or DEFAULT_CACHE_DIR)


@contextlib.asynccontextmanager
async def _connect(url: str) -> AsyncIterator[aiodocker.Docker]:
    try:
        docker = aiodocker.Docker(url=url or None)
    # aiodocker 0.27 raises AssertionError, not ValueError, when neither a URL,
    # DOCKER_HOST nor a local socket is found.
    except (ValueError, AssertionError) as exc:
        raise EnvBuildError("no Docker engine found: start dockerd, or set docker.url or DOCKER_HOST") from exc
    try:
        yield docker
    finally:
        await docker.close()


async def _inspect_image(docker: aiodocker.Docker, image: str, timeout_s: float) -> dict[str, Any] | None:
    """Return the engine's image inspect data, or None when the image is missing."""
    try:
        async with asyncio.timeout(timeout_s):
            info: dict[str, Any] = await docker.images.inspect(image)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise EnvBuildError(f"cannot inspect image {image}: {exc.message}") from exc
    except TimeoutError as exc:
        raise EnvBuildError(f"inspecting image {image} timed out after {timeout_s} s") from exc
    return info


def _labels(info: Mapping[str, Any]) -> dict[str, str]:
    config = info.get("Config") or {}
    labels = config.get("Labels") or {}
    return dict(labels)


async def _check_unbuildable(
    docker: aiodocker.Docker, env: EnvSettings, explicit: bool, docker_settings: DockerSettings
) -> Outcome:
    info = await _inspect_image(docker, env.image, docker_settings.call_timeout_s)
    if info is None and explicit:
        raise EnvBuildError(
            f"image {env.image} of environment {env.name!r} is missing and the environment has no "
            f"[envs.{env.name}.build] table; pull the image or build it elsewhere"
        )
    if info is None:
        log.warning("env_image_missing", env=env.name, image=env.image)
    else:
        log.info("env_not_buildable", env=env.name, image=env.image)
    return "not_buildable"


async def _ensure_built(
    docker: aiodocker.Docker,
    env: EnvSettings,
    build: EnvBuild,
    *,
    force: bool,
    cache_dir: Path,
    docker_settings: DockerSettings,
) -> Outcome:
    timeout_s = docker_settings.call_timeout_s
    suite = resolve_suite(build)
    spec_hash = build_spec_hash(build, suite)
    info = await _inspect_image(docker, env.image, timeout_s)
    old_hash = _labels(info).get(SPEC_HASH_LABEL) if info is not None else None
    if info is not None and old_hash == spec_hash and not force:
        log.info("env_image_present", env=env.name, image=env.image)
        return "present"

    if info is None:
        reason = "missing"
    elif old_hash != spec_hash:
        reason = "spec_changed"
    else:
        reason = "forced"
    log.info(
        "env_build_started",
        env=env.name,
        image=env.image,
        reason=reason,
        suite=suite,
        variant=build.variant,
        packages=len(build.packages),
    )
    started = time.monotonic()

    work_dir = await _make_work_dir(cache_dir, env.name)
    try:
        tarball = work_dir / "rootfs.tar"
        await _run_mmdebstrap(env.name, build, suite, tarball)
        labels = {
            ENV_LABEL: env.name,
            SPEC_HASH_LABEL: spec_hash,
            SUITE_LABEL: suite,
            PACKAGES_LABEL: ",".join(build.packages),
        }
        await _docker_import(env, tarball, labels, docker_settings.url)
    finally:
        await asyncio.to_thread(shutil.rmtree, work_dir, ignore_errors=True)

    new_info = await _inspect_image(docker, env.image, timeout_s)
    if new_info is None or _labels(new_info).get(SPEC_HASH_LABEL) != spec_hash:
        raise EnvBuildError(f"image {env.image} was imported but does not carry the expected labels")
    log.info(
        "env_build_finished",
        env=env.name,
        image=env.image,
        image_id=new_info.get("Id"),
        seconds=round(time.monotonic() - started, 1),
    )
    if info is not None and info.get("Id") != new_info.get("Id"):
        await _remove_replaced_image(docker, env, str(info.get("Id")), timeout_s)
    return "built"


async def _make_work_dir(cache_dir: Path, env_name: str) -> Path:
    def make() -> Path:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Environment names are TOML keys and may contain a slash.
        safe_name = re.sub(r"[^A-Za-z0-9_.-]", "_", env_name)
        return Path(tempfile.mkdtemp(prefix=f"envbuild-{safe_name}-", dir=cache_dir))

    try:
        return await asyncio.to_thread(make)
    except OSError as exc:
        raise EnvBuildError(
            f"cannot create a build directory in {cache_dir}: {exc.strerror}; "
            f"set {CACHE_DIR_VARIABLE} to a writable directory"
        ) from exc


def host_apt_sources(apt_dir: Path = Path("/etc/apt")) -> list[Path]:
    """Return the host's enabled apt source files: sources.list and sources.list.d/*.list|*.sources."""
    found = []
    main_list = apt_dir / "sources.list"
    try:
        if any(line.strip() and not line.lstrip().startswith("#") for line in main_list.read_text().splitlines()):
            found.append(main_list)
    except OSError:
        pass
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        found.extend(sorted(path for path in parts.iterdir() if path.suffix in (".list", ".sources")))
    return found


async def _run_mmdebstrap(env_name: str, build: EnvBuild, suite: str, tarball: Path) -> None:
    # For the host's own release, each of the host's apt source files is passed
    # as a MIRROR argument, which mmdebstrap(1) pastes into the chroot's
    # sources: the image then comes from the mirror (or proxy) the host is set
    # up for. Another release gets mmdebstrap's default mirror and, for a
    # stable suite, its updates and security sources.
    sources = await asyncio.to_thread(host_apt_sources) if not build.suite or build.suite == _host_codename() else []
    command = [
        "mmdebstrap",
        f"--variant={build.variant}",
        f"--include={','.join(build.packages)}",
        suite,
        str(tarball),
        *(str(path) for path in sources),
    ]
    # mmdebstrap assembles the root filesystem in a directory under TMPDIR
    # before it writes the tarball, so this keeps both on the cache's disk.
    environ = {**os.environ, "TMPDIR": str(tarball.parent)}
    stderr_tail = await _run(command, f"mmdebstrap for environment {env_name!r}", environ)
    if not await asyncio.to_thread(tarball.is_file):
        raise EnvBuildError(
            f"mmdebstrap for environment {env_name!r} exited 0 but wrote no {tarball}:\n" + "\n".join(stderr_tail)
        )


async def _docker_import(env: EnvSettings, tarball: Path, labels: Mapping[str, str], docker_url: str) -> None:
    # The Engine API imports a root filesystem with POST /images/create and
    # fromSrc=-, taking each Dockerfile change as a repeated `changes` query
    # parameter. aiodocker 0.27 has no public call for that (its import_image
    # posts to /images/load, which is `docker load`), so the CLI sends it.
    # JSON string quoting is valid Dockerfile quoting, so names with spaces work.
    label_change = "LABEL " + " ".join(
        f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in labels.items()
    )
    changes = [*IMAGE_CHANGES, label_change]
    command = ["docker", "import"]
    for change in changes:
        command += ["--change", change]
    command += ["--message", f"floydd environment {env.name}", str(tarball), env.image]

    environ = dict(os.environ)
    if docker_url:
        # The CLI calls plain-HTTP engines tcp://, as aiodocker also accepts.
        environ["DOCKER_HOST"] = (
            "tcp://" + docker_url.removeprefix("http://") if docker_url.startswith("http://") else docker_url
        )
    await _run(command, f"docker import of environment {env.name!r}", environ)


async def _run(command: list[str], step: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Run a command, keeping the last lines of its stderr for the error message."""
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=environ,
        )
    except FileNotFoundError as exc:
        raise EnvBuildError(
            f"{step} failed: {command[0]} is not installed (apt-get install mmdebstrap docker.io)"
        ) from exc

    assert process.stderr is not None
    tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
    try:
        async for raw in process.stderr:
            tail.append(raw.decode(errors="replace").rstrip())
        returncode = await process.wait()
    except BaseException:
        # Cancelled (for example by Ctrl-C): stop the command too. SIGTERM
        # first, because mmdebstrap 1.3 then still removes its temporary chroot.
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), _TERMINATE_GRACE_S)
            except TimeoutError:
                process.kill()
                await process.wait()
        raise
    if returncode != 0:
        raise EnvBuildError(f"{step} failed with exit status {returncode}:\n" + "\n".join(tail))
    return list(tail)


async def _remove_replaced_image(docker: aiodocker.Docker, env: EnvSettings, image_id: str, timeout_s: float) -> None:
    """Delete the image a rebuild replaced, unless a container still uses it."""
    try:
        async with asyncio.timeout(timeout_s):
            await docker.images.delete(image_id)
    except aiodocker.DockerError as exc:
        # The engine returns 409 while a container (a running job, say) uses
        # the image or another tag refers to it. Either way it must stay.
        log.info("env_old_image_kept", env=env.name, image_id=image_id, error=exc.message)
        return
    except TimeoutError:
        log.warning("env_old_image_delete_timed_out", env=env.name, image_id=image_id, timeout_s=timeout_s)
        return
    log.info("env_old_image_removed", env=env.name, image_id=image_id)
