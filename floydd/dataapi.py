"""HTTP routes for what jobs keep and share: job outputs, job deletion and datasets."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import structlog
from aiohttp import web

from floydd.admission import check_dataset_quota, upload_limit
from floydd.auth import User, ensure_job_access, request_user
from floydd.config import Settings
from floydd.datasets import (
    NAME_PATTERN,
    DatasetInUse,
    DatasetNotFound,
    DatasetVersion,
    check_name,
    may_use_dataset,
    measure,
)
from floydd.errors import Conflict, InvalidRequest, NotFound
from floydd.openapi import JOB_ID_PARAMETER, PATHS, SCHEMAS, Schema, error_responses, json_body, ref
from floydd.outputs import output_file, send_tar_gz
from floydd.supervisor import Supervisor
from floydd.uploads import UnpackLimits, receive_submission, unpack_archive

log = structlog.get_logger(__name__)


class DataApi:
    def __init__(self, settings: Settings, supervisor: Supervisor) -> None:
        self._settings = settings
        self._supervisor = supervisor

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/api/v1/jobs/{job_id}/output", self.output),
            web.delete("/api/v1/jobs/{job_id}", self.delete_job),
            web.post("/api/v1/datasets", self.create_dataset),
            web.get("/api/v1/datasets", self.list_datasets),
            web.get("/api/v1/datasets/{name}", self.show_dataset),
            web.get("/api/v1/datasets/{name}/{version}", self.show_dataset),
            web.delete("/api/v1/datasets/{name}/{version}", self.delete_dataset),
        ]

    # Jobs

    async def output(self, request: web.Request) -> web.StreamResponse:
        """Send the job's /output as a tar.gz, or with `?path=FILE` that one file."""
        job = ensure_job_access(request_user(request), await self._supervisor.get(request.match_info["job_id"]))
        folder = self._supervisor.files(job.id).output
        if not job.state.is_final:
            # A running container could swap a checked path for a symlink to a host
            # file before floydd opens it; once the job ended, no process can.
            raise Conflict(
                f"job {job.id} is {job.state.value}; its output can be downloaded once it ends", state=job.state.value
            )
        if "pruned_at" in job.options:
            raise NotFound(f"the output of job {job.id} was pruned at {job.options['pruned_at']}")
        if not folder.is_dir():
            raise NotFound(f"job {job.id} has no output yet")
        if "path" in request.query:
            return web.FileResponse(output_file(folder, request.query["path"]))
        return await send_tar_gz(request, folder, f"{job.id}-output")

    async def delete_job(self, request: web.Request) -> web.Response:
        ensure_job_access(request_user(request), await self._supervisor.get(request.match_info["job_id"]))
        await asyncio.shield(self._supervisor.delete(request.match_info["job_id"]))
        return web.json_response({"deleted": request.match_info["job_id"]})

    # Datasets

    async def create_dataset(self, request: web.Request) -> web.Response:
        user = request_user(request)
        datasets = self._supervisor.datasets
        spool = datasets.new_staging_path()
        unpacked = spool.with_suffix(".unpacked")
        try:
            submission = await receive_submission(
                request,
                spool,
                upload_limit(self._settings, user),
                self._settings.server.body_timeout_s,
                archive_field="data",
            )
            unknown = sorted(set(submission.fields) - {"name"})
            if unknown or submission.repeated:
                raise InvalidRequest("a dataset upload takes only the fields name and data")
            name = check_name(submission.fields.get("name", ""))
            limits = UnpackLimits.from_settings(self._settings.uploads)
            await asyncio.shield(asyncio.to_thread(unpack_archive, spool, unpacked, limits))
            await self._check_quota(user, unpacked)
            dataset = await asyncio.shield(datasets.add(name, unpacked, user.name))
        finally:
            with contextlib.suppress(OSError):
                spool.unlink()
            await asyncio.to_thread(shutil.rmtree, unpacked, True)
        log.info("dataset_stored", dataset=dataset.id, bytes=dataset.bytes, files=dataset.files)
        return web.json_response(dataset.to_json(), status=201, headers={"Location": f"/api/v1/datasets/{dataset.id}"})

    async def _check_quota(self, user: User, unpacked: Path) -> None:
        _, added_bytes = await asyncio.to_thread(measure, unpacked)
        owned = await asyncio.to_thread(self._supervisor.datasets.list)
        current_bytes = sum(dataset.bytes for dataset in owned if dataset.owner == user.name)
        check_dataset_quota(self._settings, user, current_bytes, added_bytes)

    async def list_datasets(self, request: web.Request) -> web.Response:
        user = request_user(request)
        datasets = await asyncio.to_thread(self._supervisor.datasets.list)
        visible = [dataset.to_json() for dataset in datasets if may_use_dataset(user, dataset)]
        return web.json_response({"datasets": visible})

    async def show_dataset(self, request: web.Request) -> web.Response:
        return web.json_response(self._visible_dataset(request).to_json())

    def _visible_dataset(self, request: web.Request) -> DatasetVersion:
        """Return the dataset the route names; another user's dataset is reported as missing."""
        name = request.match_info["name"]
        dataset = self._supervisor.datasets.get(name, _version(request))
        if not may_use_dataset(request_user(request), dataset):
            raise DatasetNotFound(f"no dataset named {name!r}")
        return dataset

    async def delete_dataset(self, request: web.Request) -> web.Response:
        dataset = self._visible_dataset(request)
        # NOTE: a job whose submission is still being unpacked is not in the store yet; if it
        # names this version, it fails at start with "no dataset version" instead of a 409 here.
        users = await self._supervisor.jobs_using(lambda entry: entry.get("dataset") == dataset.id)
        if users:
            raise DatasetInUse(
                f"dataset {dataset.id} is mounted by unfinished job {users[0].id}", job_ids=[job.id for job in users]
            )
        await asyncio.shield(self._supervisor.datasets.delete(dataset))
        log.info("dataset_deleted", dataset=dataset.id)
        return web.json_response({"deleted": dataset.id})


def _version(request: web.Request) -> int | None:
    text = request.match_info.get("version")
    if text is None:
        return None
    if not text.isdigit():
        raise InvalidRequest(f"invalid dataset version {text!r}: use a number")
    return int(text)


DATASET_PARAMETERS: list[Schema] = [
    {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "the dataset's name",
        "schema": {"type": "string", "pattern": NAME_PATTERN.pattern, "not": {"const": "jobs"}},
    },
]
VERSION_PARAMETER: Schema = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "the version number",
    "schema": {"type": "string", "pattern": "^[0-9]{1,9}$"},
}
SCHEMAS.update(
    {
        "Dataset": {
            "type": "object",
            "required": ["id", "name", "version", "bytes", "files", "created_at"],
            "properties": {
                "id": {"type": "string", "description": "NAME/VERSION"},
                "name": {"type": "string"},
                "version": {"type": "integer"},
                "bytes": {"type": "integer"},
                "files": {"type": "integer"},
                "created_at": {"type": "string"},
                "owner": {"type": ["string", "null"]},
            },
        },
        "DatasetUpload": {
            "type": "object",
            "required": ["name", "data"],
            "properties": {
                "name": {
                    "type": "string",
                    "pattern": NAME_PATTERN.pattern,
                    "not": {"const": "jobs"},
                    "description": "1 to 64 lowercase letters, digits, '.', '_' or '-'",
                },
                "data": {"type": "string", "contentMediaType": "application/octet-stream"},
            },
        },
    }
)
PATHS.update(
    {
        "/api/v1/jobs/{job_id}/output": {
            "parameters": [JOB_ID_PARAMETER],
            "get": {
                "operationId": "getJobOutput",
                "summary": "The ended job's /output as a tar.gz, or with path=FILE one file",
                "parameters": [{"name": "path", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "the archive or the file", "content": {"*/*": {"schema": {}}}},
                    **error_responses(400, 404, 409),
                },
            },
        },
        "/api/v1/datasets": {
            "get": {
                "operationId": "listDatasets",
                "summary": "List the caller's datasets, or every dataset for an admin",
                "responses": {"200": json_body({"type": "object"}, "the datasets"), **error_responses()},
            },
            "post": {
                "operationId": "createDataset",
                "summary": "Upload the next version of a dataset",
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": ref("DatasetUpload")}}},
                "responses": {
                    "201": json_body(ref("Dataset"), "the new version"),
                    **error_responses(400, 408, 409, 413, 417),
                },
            },
        },
        "/api/v1/datasets/{name}": {
            "parameters": DATASET_PARAMETERS,
            "get": {
                "operationId": "getDataset",
                "summary": "The latest version of a dataset",
                "responses": {"200": json_body(ref("Dataset"), "the version"), **error_responses(400, 404)},
            },
        },
        "/api/v1/datasets/{name}/{version}": {
            "parameters": [*DATASET_PARAMETERS, VERSION_PARAMETER],
            "get": {
                "operationId": "getDatasetVersion",
                "summary": "One version of a dataset",
                "responses": {"200": json_body(ref("Dataset"), "the version"), **error_responses(400, 404)},
            },
            "delete": {
                "operationId": "deleteDatasetVersion",
                "summary": "Delete a version that no unfinished job mounts",
                "responses": {"200": json_body({"type": "object"}, "the deleted id"), **error_responses(400, 404, 409)},
            },
        },
    }
)
PATHS["/api/v1/jobs/{job_id}"]["delete"] = {
    "operationId": "deleteJob",
    "summary": "Delete an ended job: its record, code, output and logs",
    "responses": {"200": json_body({"type": "object"}, "the deleted id"), **error_responses(404, 409, 503)},
}
