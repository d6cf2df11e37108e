"""HTTP routes of the API: thin handlers that validate, call the supervisor, and answer JSON."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import shlex
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from floydd.admission import check_running_jobs, check_upload_size, expect_handler, upload_limit
from floydd.auth import User, ensure_job_access, request_user
from floydd.config import Settings
from floydd.errors import FloyddError, InvalidRequest, ServiceUnavailable
from floydd.jobrequests import REQUEST_FIELDS, resolve_requests
from floydd.jobs import Job, JobMode, JobState, new_job_id, utcnow
from floydd.runtime import DockerRuntime
from floydd.store import JobStore
from floydd.supervisor import Supervisor
from floydd.uploads import Submission, UnpackLimits, receive_submission, unpack_archive

log = structlog.get_logger(__name__)

SUBMISSION_FIELDS = frozenset({"mode", "command", "env", "max_uptime", "concurrency", "private"}) | REQUEST_FIELDS
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
# Larger than any max_uptime_limit_s, and small enough that float-to-int stays exact.
_MAX_DURATION_S = 10 * 365 * 86400
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
LOG_POLL_INTERVAL_S = 0.25


def parse_duration(text: str) -> int:
    """Parse `90`, `90s`, `30m`, `12h` or `7d` into whole seconds (at least 1)."""
    match = _DURATION.match(text)
    if match is None:
        raise InvalidRequest(f"invalid duration {text!r}: use seconds or a number with s, m, h or d, like 30m")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 1:
        raise InvalidRequest(f"invalid duration {text!r}: must be at least 1 second")
    if seconds > _MAX_DURATION_S:
        raise InvalidRequest(f"invalid duration {text!r}: must be at most {_MAX_DURATION_S} seconds (10 years)")
    return int(seconds)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into a JSON body `{"error": ..., "detail": ...}` with its status."""
    try:
        return await handler(request)
    except FloyddError as exc:
        if exc.status >= 500:
            log.warning("request_failed", path=request.path, status=exc.status, error=exc.code, detail=exc.detail)
        return web.json_response(exc.to_json(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.empty_body or exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        detail = exc.text or exc.reason
        if detail == f"{exc.status}: {exc.reason}":
            # aiohttp's default text for an unknown route or method names neither.
            detail = f"{exc.reason.lower()}: {request.method} {request.path}"
        return web.json_response(
            {"error": code, "detail": detail},
            status=exc.status,
            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request_crashed", path=request.path, method=request.method)
        return web.json_response(
            {"error": "internal_error", "detail": "internal error; see the daemon's log"}, status=500
        )


class JobsApi:
    def __init__(self, settings: Settings, supervisor: Supervisor, runtime: DockerRuntime, store: JobStore) -> None:
        self._settings = settings
        self._supervisor = supervisor
        self._runtime = runtime
        self._store = store
        # Held from the running-jobs check to the insert, so parallel uploads cannot both pass it.
        self._submit_lock = asyncio.Lock()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/v1/jobs", self.create, expect_handler=expect_handler(self._admit_upload)),
            web.get("/api/v1/jobs", self.list),
            web.get("/api/v1/jobs/{job_id}", self.show),
            web.get("/api/v1/jobs/{job_id}/logs", self.logs),
            web.post("/api/v1/jobs/{job_id}/stop", self.stop),
            web.get("/healthz", self.health),
        ]

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _admit_upload(self, request: web.Request) -> None:
        """Reject an upload by its headers alone: too large, or too many jobs already."""
        user = request_user(request)
        check_upload_size(self._settings, user, request.content_length)
        await check_running_jobs(self._settings, self._store, user)

    async def create(self, request: web.Request) -> web.Response:
        user = request_user(request)
        await self._admit_upload(request)
        job_id = new_job_id()
        spool = self._supervisor.spool_path(job_id)
        try:
            submission = await receive_submission(
                request, spool, upload_limit(self._settings, user), self._settings.server.body_timeout_s
            )
            # From here the upload is whole: finish even if the client goes away.
            job = await asyncio.shield(self._create_job(job_id, submission, user))
        except BaseException:
            with contextlib.suppress(OSError):
                spool.unlink()
            raise
        body = job.to_json(self._settings.base_url())
        return web.json_response(body, status=201, headers={"Location": f"/api/v1/jobs/{job.id}"})

    async def _create_job(self, job_id: str, submission: Submission, user: User) -> Job:
        job = self._job_from_fields(job_id, submission.fields, user)
        job = await self._with_requests(job, submission, user)
        if not await self._runtime.image_exists(job.image):
            raise ServiceUnavailable(
                f"image {job.image} of env {job.env!r} is not present; run `floydd env build {job.env}`"
            )
        files = self._supervisor.files(job_id)
        assert submission.archive is not None
        limits = UnpackLimits.from_settings(self._settings.uploads)
        files.root.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(unpack_archive, submission.archive, files.code, limits)
            if job.mode is JobMode.SERVE and not (files.code / "app.py").is_file():
                raise InvalidRequest("serve mode needs app.py at the archive root or in its one top folder")
        except BaseException:
            await asyncio.to_thread(_remove_tree, files.root)
            raise
        finally:
            with contextlib.suppress(OSError):
                submission.archive.unlink()
        log.info("upload_unpacked", job_id=job_id, archive=submission.archive_name, bytes=submission.archive_bytes)
        async with self._submit_lock:
            try:
                await check_running_jobs(self._settings, self._store, user)
            except BaseException:
                await asyncio.to_thread(_remove_tree, files.root)
                raise
            return await self._supervisor.submit(job)

    async def _with_requests(self, job: Job, submission: Submission, user: User) -> Job:
        """Add the job's data mounts, GPUs and limits; a GPU job runs the env's GPU image when it names one."""
        data = submission.repeated.get("data", [])
        options = await resolve_requests(submission.fields, data, self._supervisor.request_context(user))
        image = job.image
        gpu_image = self._settings.envs[job.env].gpu_image
        if options.get("gpus") and gpu_image:
            image = gpu_image
        return dataclasses.replace(job, image=image, options={**job.options, **options})

    def _job_from_fields(self, job_id: str, fields: dict[str, str], user: User) -> Job:
        unknown = sorted(set(fields) - SUBMISSION_FIELDS)
        if unknown:
            raise InvalidRequest(
                f"unknown field {unknown[0]!r}; known fields: code, {', '.join(sorted(SUBMISSION_FIELDS))}"
            )
        mode_text = fields.get("mode", JobMode.COMMAND.value)
        try:
            mode = JobMode(mode_text)
        except ValueError:
            raise InvalidRequest(f"invalid mode {mode_text!r}: use serve or command") from None
        command = fields.get("command")
        if mode is JobMode.SERVE and command is not None:
            raise InvalidRequest("command is not allowed in serve mode, which always runs python app.py")
        if mode is JobMode.COMMAND:
            if not command or not command.strip():
                raise InvalidRequest("command mode needs a non-empty command field")
            with contextlib.suppress(ValueError):
                shlex.split(command)
        env_name = fields.get("env") or self._settings.jobs.default_env
        env = self._settings.envs.get(env_name)
        if env is None:
            raise InvalidRequest(f"unknown env {env_name!r}; known envs: {', '.join(self._settings.envs)}")
        max_uptime_s = self._settings.jobs.default_max_uptime_s
        if "max_uptime" in fields:
            max_uptime_s = parse_duration(fields["max_uptime"])
        max_uptime_s = min(max_uptime_s, self._settings.jobs.max_uptime_limit_s)
        options: dict[str, Any] = {}
        if "concurrency" in fields:
            options["concurrency"] = self._parse_concurrency(fields["concurrency"], mode)
        if _parse_private(fields.get("private", "false")):
            options["private"] = True
        created_at = utcnow()
        return Job(
            id=job_id,
            mode=mode,
            env=env.name,
            image=env.image,
            state=JobState.QUEUED,
            created_at=created_at,
            deadline=created_at + timedelta(seconds=max_uptime_s),
            command=command if mode is JobMode.COMMAND else None,
            owner=user.name,
            options=options,
        )

    def _parse_concurrency(self, text: str, mode: JobMode) -> int:
        """Parse the requests a serve job takes at once; values over proxy.max_concurrency are capped."""
        if mode is not JobMode.SERVE:
            raise InvalidRequest("concurrency applies to serve mode only")
        try:
            concurrency = int(text)
        except ValueError:
            concurrency = 0
        if concurrency < 1:
            raise InvalidRequest(f"invalid concurrency {text!r}: use a whole number of at least 1")
        return min(concurrency, self._settings.proxy.max_concurrency)

    async def list(self, request: web.Request) -> web.Response:
        states = None
        if "state" in request.query:
            # `state=a,b` and `state=a&state=b` both keep jobs in either state.
            names = [name for value in request.query.getall("state") for name in value.split(",")]
            try:
                states = [JobState(name) for name in names]
            except ValueError:
                raise InvalidRequest(
                    f"invalid state filter {','.join(names)!r}; states: {', '.join(s.value for s in JobState)}"
                ) from None
        user = request_user(request)
        if user.is_admin:
            jobs = await self._supervisor.list(states)
        else:
            jobs = await self._store.list(states, owner=user.name)
        base_url = self._settings.base_url()
        return web.json_response({"jobs": [job.to_json(base_url) for job in jobs]})

    async def _get_visible(self, request: web.Request) -> Job:
        job = await self._supervisor.get(request.match_info["job_id"])
        return ensure_job_access(request_user(request), job)

    async def show(self, request: web.Request) -> web.Response:
        job = await self._get_visible(request)
        return web.json_response(job.to_json(self._settings.base_url()))

    async def stop(self, request: web.Request) -> web.Response:
        visible = await self._get_visible(request)
        job = await asyncio.shield(self._supervisor.stop(visible.id))
        return web.json_response(job.to_json(self._settings.base_url()))

    async def logs(self, request: web.Request) -> web.StreamResponse:
        job = await self._get_visible(request)
        follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
        path = self._supervisor.files(job.id).logs
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        offset = await _copy_new(path, 0, response)
        while follow and not job.state.is_final:
            await asyncio.sleep(LOG_POLL_INTERVAL_S)
            job = await self._supervisor.get(job.id)
            offset = await _copy_new(path, offset, response)
        # The log pump may write the last lines just after the job is final.
        if follow:
            await asyncio.sleep(LOG_POLL_INTERVAL_S)
            await _copy_new(path, offset, response)
        await response.write_eof()
        return response


def _parse_private(text: str) -> bool:
    private = _BOOLEANS.get(text.strip().lower())
    if private is None:
        raise InvalidRequest(f"invalid private {text!r}: use true or false")
    return private


async def _copy_new(path: Path, offset: int, response: web.StreamResponse) -> int:
    """Send what was appended to `path` since `offset`; return the new offset."""
    try:
        with path.open("rb") as source:
            source.seek(offset)
            while chunk := source.read(64 * 1024):
                await response.write(chunk)
                offset += len(chunk)
    except FileNotFoundError:
        pass
    return offset


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
