"""Settings: a typed, frozen view of `floydd.toml`, checked once at start-up.

Every setting has an embedded default, so `floydd serve` runs without a file;
`floydd.toml` at the repository root documents the same defaults. A file may
set any subset. An unknown key, a wrong type or an out-of-range value raises
`ConfigError` naming the key, because a typo that is silently ignored would run
the daemon with a setting the operator did not choose.

`FLOYDD_<SECTION>_<KEY>` environment variables override scalar settings
(for example `FLOYDD_SERVER_PORT=9000`), which suits systemd drop-ins.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ENV_NAME = "flask"

# Debian packages of the default serve environment: Flask for the app, pip for
# floyd_requirements.txt, Pillow and NumPy because most model demos decode
# images or arrays, and python-is-python3 so that `python app.py` works.
DEFAULT_ENV_PACKAGES = (
    "python3",
    "python3-flask",
    "python3-pip",
    "python3-pil",
    "python3-numpy",
    "python-is-python3",
    "ca-certificates",
)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Base URL put in job endpoints; empty means http://<host>:<port>.
    public_url: str = ""
    state_dir: str = "/var/lib/floydd"
    # Grace period for requests in flight when the daemon stops.
    shutdown_grace_s: float = 10.0
    # Request limits of the HTTP server; a request over one gets a 400.
    max_request_line_bytes: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 100
    # An idle connection, or one whose request headers are still incomplete,
    # is closed after this many seconds, so slow clients cannot pin connections.
    keepalive_timeout_s: float = 60.0
    # Maximum pause in seconds between two reads of an upload body before a 408.
    body_timeout_s: float = 60.0


@dataclass(frozen=True)
class DockerSettings:
    # Empty means the local engine: DOCKER_HOST, else /var/run/docker.sock.
    url: str = ""
    # Upper bound on one Docker API call, so a hung engine cannot hang a job.
    call_timeout_s: float = 30.0
    # Bridge network for job containers, created with inter-container traffic
    # disabled so one job cannot reach another's app around /expose. Empty
    # means Docker's default bridge, where containers reach each other.
    network: str = "floydd-jobs"


@dataclass(frozen=True)
class JobSettings:
    default_env: str = DEFAULT_ENV_NAME
    default_max_uptime_s: int = 7 * 24 * 3600
    # Cap on the max_uptime a job may request.
    max_uptime_limit_s: int = 7 * 24 * 3600
    # Time a serve job has to install its requirements and accept connections.
    start_timeout_s: float = 600.0
    # Time between SIGTERM and SIGKILL when a container is stopped.
    stop_grace_s: int = 10


@dataclass(frozen=True)
class UploadSettings:
    max_upload_bytes: int = 1024**3
    max_unpacked_bytes: int = 4 * 1024**3
    max_files: int = 100_000
    max_file_bytes: int = 2 * 1024**3
    # Unpacked bytes per compressed byte; archives under 1 MiB count as 1 MiB.
    max_compression_ratio: float = 200.0


@dataclass(frozen=True)
class LimitSettings:
    """Limits that apply to each user separately; admin tokens are exempt."""

    # Jobs of one user that are queued, starting, serving or running.
    max_running_jobs: int = 8
    max_upload_bytes: int = 1024**3
    # Total size of one user's datasets.
    max_dataset_bytes: int = 100 * 1024**3


@dataclass(frozen=True)
class ProxySettings:
    # Requests that may wait for one job besides those in flight; more get 503.
    # 0 sizes each job's queue as 10 times its concurrency, at least 20.
    max_queue_depth: int = 0
    # Maximum wait in the queue, start-up included, before a 503.
    queue_timeout_s: float = 300.0
    # Maximum wait for the app to start its response, then 504.
    response_timeout_s: float = 300.0
    # Maximum time from sending a request to the app to the end of its
    # response. Past it, a response that has not started gets a 504 and one
    # that has started is aborted.
    total_timeout_s: float = 300.0
    # Largest `concurrency` a job may request at creation.
    max_concurrency: int = 8
    # Largest request body sent to an app; more gets 413 before the body is read.
    max_request_body_bytes: int = 4 * 1024**3
    # Chunked request bodies are read whole before they are queued; up to this
    # many bytes stay in memory, the rest goes to a temporary file.
    request_buffer_bytes: int = 1024**2
    # Maximum pause in a chunked request body while floydd reads it, then 408.
    request_body_timeout_s: float = 60.0
    # Open the next connection to an app that closes each one (Werkzeug
    # does) while a request is in flight, so the next request does not wait
    # for a connect. The spare is closed after 2 s unused.
    preconnect: bool = True


@dataclass(frozen=True)
class ResourceSettings:
    """Limits of each job's container; a job may request other values up to the caps."""

    # Memory limit in MiB; swap is not added on top, so the limit is the whole budget.
    default_memory_mib: int = 4096
    max_memory_mib: int = 65536
    default_cpus: float = 2.0
    max_cpus: float = 16.0
    # Max processes and threads in one container, against fork bombs.
    pids_limit: int = 4096


@dataclass(frozen=True)
class LifecycleSettings:
    """Job retention after jobs end, and the fate of containers when floydd stops."""

    # Seconds a finished job's files, output and logs are kept before they are pruned.
    retention_s: int = 30 * 86400
    # Seconds between two passes of the pruner.
    prune_interval_s: float = 3600.0
    # False: containers keep running across a daemon stop and are adopted at the next start.
    stop_containers_on_shutdown: bool = False


@dataclass(frozen=True)
class GpuSettings:
    # "auto" asks nvidia-smi for the GPUs at start-up; "none" runs without GPUs.
    discovery: str = "auto"


@dataclass(frozen=True)
class EnvBuild:
    """How to build an environment image offline from Debian packages."""

    packages: tuple[str, ...] = DEFAULT_ENV_PACKAGES
    # Empty means the host's own release (VERSION_CODENAME in /etc/os-release).
    suite: str = ""
    variant: str = "minbase"


@dataclass(frozen=True)
class EnvSettings:
    """An environment a job runs in: a Docker image, optionally built locally."""

    name: str
    image: str
    description: str = ""
    # Image for jobs that request GPUs; empty means `image`.
    gpu_image: str = ""
    # None means the image is expected to exist already (pulled or built elsewhere).
    build: EnvBuild | None = None


def default_envs() -> dict[str, EnvSettings]:
    return {
        DEFAULT_ENV_NAME: EnvSettings(
            name=DEFAULT_ENV_NAME,
            image="floydd/flask:latest",
            description="Python 3 with Flask, pip, Pillow and NumPy from Debian packages",
            build=EnvBuild(),
        )
    }


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    jobs: JobSettings = field(default_factory=JobSettings)
    uploads: UploadSettings = field(default_factory=UploadSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    gpus: GpuSettings = field(default_factory=GpuSettings)
    envs: Mapping[str, EnvSettings] = field(default_factory=default_envs)

    @property
    def state_path(self) -> Path:
        return Path(self.server.state_dir)

    def base_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "docker": DockerSettings,
    "jobs": JobSettings,
    "uploads": UploadSettings,
    "proxy": ProxySettings,
    "limits": LimitSettings,
    "resources": ResourceSettings,
    "lifecycle": LifecycleSettings,
    "gpus": GpuSettings,
}


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Load settings from a TOML file (or the embedded defaults), then overrides.

    `overrides` are dotted keys from the command line, such as
    `{"server.port": 0}`; they win over the environment, which wins over the file.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML in {path}: {exc}") from exc
    settings = _parse(raw)
    settings = _apply_environ(settings, os.environ if environ is None else environ)
    for dotted, value in overrides.items():
        if value is not None:
            settings = _replace_key(settings, dotted, value, source="command line")
    _check(settings)
    return settings


def _parse(raw: Mapping[str, Any]) -> Settings:
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "envs":
            continue
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section [{name}]; known: {', '.join([*_SECTIONS, 'envs'])}")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        sections[name] = _build(_SECTIONS[name], value, name)
    envs = _parse_envs(raw["envs"]) if "envs" in raw else default_envs()
    return Settings(**sections, envs=envs)


def _parse_envs(raw: Any) -> dict[str, EnvSettings]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError("[envs] must contain at least one [envs.NAME] table")
    envs = {}
    for name, table in raw.items():
        prefix = f"envs.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{prefix} must be a table")
        table = dict(table)
        build_raw = table.pop("build", None)
        build = None
        if build_raw is not None:
            if not isinstance(build_raw, dict):
                raise ConfigError(f"{prefix}.build must be a table")
            build = _build(EnvBuild, build_raw, f"{prefix}.build")
        env = _build(EnvSettings, {"name": name, **table}, prefix, required=("image",))
        envs[name] = dataclasses.replace(env, build=build)
    return envs


def _build(cls: type, values: Mapping[str, Any], prefix: str, required: tuple[str, ...] = ()) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "build"}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {prefix}.{key}; known: {', '.join(fields)}")
        kwargs[key] = _coerce(value, fields[key].type, f"{prefix}.{key}")
    for key in required:
        if key not in kwargs:
            raise ConfigError(f"missing key {prefix}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, type_name: Any, key: str) -> Any:
    """Check a TOML value against a field's annotation (a string under PEP 563)."""
    expected = str(type_name)
    if expected == "bool":
        ok = isinstance(value, bool)
    elif expected == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected == "str":
        ok = isinstance(value, str)
    elif expected == "tuple[str, ...]":
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        value = tuple(value) if ok else value
    else:
        raise AssertionError(f"no coercion for {expected}")
    if not ok:
        raise ConfigError(f"invalid value for {key}: expected {expected}, got {value!r}")
    return value


def _apply_environ(settings: Settings, environ: Mapping[str, str]) -> Settings:
    for variable, text in environ.items():
        if not variable.startswith("FLOYDD_"):
            continue
        rest = variable[len("FLOYDD_") :].lower()
        section, _, key = rest.partition("_")
        if section not in _SECTIONS:
            continue
        settings = _replace_key(settings, f"{section}.{key}", text, source=variable)
    return settings


def _replace_key(settings: Settings, dotted: str, value: Any, source: str) -> Settings:
    section, _, key = dotted.partition(".")
    current = getattr(settings, section, None)
    if section not in _SECTIONS or current is None:
        raise ConfigError(f"{source}: unknown setting {dotted}")
    fields = {f.name: f for f in dataclasses.fields(current)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown setting {dotted}")
    expected = str(fields[key].type)
    if isinstance(value, str) and expected != "str":
        value = _parse_scalar(value, expected, f"{source} ({dotted})")
    value = _coerce(value, expected, dotted)
    return dataclasses.replace(settings, **{section: dataclasses.replace(current, **{key: value})})


def _parse_scalar(text: str, expected: str, key: str) -> Any:
    try:
        if expected == "int":
            return int(text)
        if expected == "float":
            return float(text)
        if expected == "bool":
            return {"true": True, "false": False}[text.lower()]
    except (ValueError, KeyError):
        pass
    raise ConfigError(f"invalid value for {key}: expected {expected}, got {text!r}")


def _check(settings: Settings) -> None:
    """Reject values that parse but cannot work together."""
    positive = {
        "server.shutdown_grace_s": settings.server.shutdown_grace_s,
        "docker.call_timeout_s": settings.docker.call_timeout_s,
        "jobs.default_max_uptime_s": settings.jobs.default_max_uptime_s,
        "jobs.max_uptime_limit_s": settings.jobs.max_uptime_limit_s,
        "jobs.start_timeout_s": settings.jobs.start_timeout_s,
        "uploads.max_upload_bytes": settings.uploads.max_upload_bytes,
        "uploads.max_unpacked_bytes": settings.uploads.max_unpacked_bytes,
        "uploads.max_files": settings.uploads.max_files,
        "proxy.queue_timeout_s": settings.proxy.queue_timeout_s,
        "proxy.response_timeout_s": settings.proxy.response_timeout_s,
        "proxy.total_timeout_s": settings.proxy.total_timeout_s,
        "proxy.max_concurrency": settings.proxy.max_concurrency,
        "proxy.max_request_body_bytes": settings.proxy.max_request_body_bytes,
        "proxy.request_body_timeout_s": settings.proxy.request_body_timeout_s,
        "server.max_request_line_bytes": settings.server.max_request_line_bytes,
        "server.max_header_bytes": settings.server.max_header_bytes,
        "server.max_headers": settings.server.max_headers,
        "server.keepalive_timeout_s": settings.server.keepalive_timeout_s,
        "server.body_timeout_s": settings.server.body_timeout_s,
        "uploads.max_file_bytes": settings.uploads.max_file_bytes,
        "uploads.max_compression_ratio": settings.uploads.max_compression_ratio,
        "limits.max_running_jobs": settings.limits.max_running_jobs,
        "limits.max_upload_bytes": settings.limits.max_upload_bytes,
        "limits.max_dataset_bytes": settings.limits.max_dataset_bytes,
        "resources.default_memory_mib": settings.resources.default_memory_mib,
        "resources.max_memory_mib": settings.resources.max_memory_mib,
        "resources.default_cpus": settings.resources.default_cpus,
        "resources.max_cpus": settings.resources.max_cpus,
        "resources.pids_limit": settings.resources.pids_limit,
        "lifecycle.retention_s": settings.lifecycle.retention_s,
        "lifecycle.prune_interval_s": settings.lifecycle.prune_interval_s,
    }
    for key, value in positive.items():
        # `not value > 0` also rejects NaN, which an environment override can carry.
        if not value > 0 or value == math.inf:
            raise ConfigError(f"invalid value for {key}: must be a positive finite number, got {value}")
    if settings.jobs.stop_grace_s < 0:
        raise ConfigError("invalid value for jobs.stop_grace_s: must not be negative")
    if settings.proxy.max_queue_depth < 0:
        raise ConfigError("invalid value for proxy.max_queue_depth: must not be negative")
    if settings.proxy.request_buffer_bytes < 0:
        raise ConfigError("invalid value for proxy.request_buffer_bytes: must not be negative")
    if not 0 <= settings.server.port <= 65535:
        raise ConfigError(f"invalid value for server.port: {settings.server.port} is not a TCP port")
    if settings.jobs.default_max_uptime_s > settings.jobs.max_uptime_limit_s:
        raise ConfigError(
            "invalid value for jobs.default_max_uptime_s: "
            f"{settings.jobs.default_max_uptime_s} exceeds jobs.max_uptime_limit_s"
        )
    _check_resources(settings.resources)
    if settings.gpus.discovery not in ("auto", "none"):
        raise ConfigError(f"invalid value for gpus.discovery: expected auto or none, got {settings.gpus.discovery!r}")
    if settings.jobs.default_env not in settings.envs:
        raise ConfigError(
            f"invalid value for jobs.default_env: no environment named {settings.jobs.default_env!r} in [envs]"
        )


def _check_resources(resources: ResourceSettings) -> None:
    if resources.default_memory_mib > resources.max_memory_mib:
        raise ConfigError("invalid value for resources.default_memory_mib: exceeds resources.max_memory_mib")
    if resources.default_cpus > resources.max_cpus:
        raise ConfigError("invalid value for resources.default_cpus: exceeds resources.max_cpus")
    if resources.max_memory_mib < 6:
        # Docker rejects memory limits under 6 MiB.
        raise ConfigError("invalid value for resources.max_memory_mib: Docker needs at least 6 MiB")
