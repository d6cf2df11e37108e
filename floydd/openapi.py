"""The OpenAPI 3.1 description of the `/api/v1` routes, served at `/api/v1/openapi.json`.

Written by hand next to the routes rather than generated, so that it states
the contract (errors, limits, auth) and not only the shapes. A test checks
that every `/api` route of the application is described here and that every
path described here is routed, and schemathesis runs against it. A module that
adds routes adds its paths with `PATHS.update(...)`, built from the helpers below.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from floydd import __version__
from floydd.uploads import ARCHIVE_TYPES

JSON = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def error_responses(*statuses: int) -> dict[str, Schema]:
    """Return the error responses of an operation; 401 is added to every one."""
    descriptions = {
        400: "invalid request; `detail` names the field, part or archive member",
        401: "missing, invalid or revoked bearer token",
        404: "no such job, or a job of another user",
        408: "the client paused longer than server.body_timeout_s while sending the body",
        409: "the job has already ended",
        413: "the upload is over the limit named in `limit`",
        417: "an Expect header other than 100-continue",
        429: "the user has as many unfinished jobs as limits.max_running_jobs allows",
        503: "the job's image is missing, or the job is not supervised by this daemon",
    }
    responses = {str(status): json_body(ref("Error"), descriptions[status]) for status in sorted({401, *statuses})}
    responses["401"]["headers"] = {
        "WWW-Authenticate": {"description": 'always `Bearer realm="floydd"`', "schema": {"type": "string"}}
    }
    return responses


JOB_ID_PARAMETER: Schema = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "description": "the job's id: 32 hexadecimal digits",
    "schema": {"type": "string"},
}

JOB_STATES = ["queued", "starting", "serving", "running", "succeeded", "failed", "stopped", "timed_out"]
_STATE = f"({'|'.join(JOB_STATES)})"

# Fields of an upload whose body is the archive itself; multipart uploads send them as parts instead.
RAW_UPLOAD_PARAMETERS: list[Schema] = [
    {"name": name, "in": "query", "required": False, "description": description, "schema": {"type": "string"}}
    for name, description in [
        ("mode", "serve or command (default)"),
        ("command", "command mode only: the shell command to run"),
        ("env", "an environment from the config"),
        ("max_uptime", "90, 90s, 30m, 12h or 7d"),
        ("private", "true or false (default)"),
        ("concurrency", "serve mode only: requests the app takes at once"),
        ("data", "NAME[/VERSION]:MOUNT or jobs/<id>:MOUNT, a read-only dataset or job output"),
        ("gpu", "whole GPUs the job gets exclusively"),
        ("memory", "memory limit such as 512m or 8g, up to resources.max_memory_mib"),
        ("cpus", "CPU limit such as 1.5, up to resources.max_cpus"),
        ("filename", "the archive's file name, for the log"),
    ]
]

SCHEMAS: dict[str, Schema] = {
    "Error": {
        "type": "object",
        "required": ["error", "detail"],
        "properties": {
            "error": {"type": "string", "description": "stable machine-readable code, such as job_not_found"},
            "detail": {"type": "string", "description": "what went wrong and what to do"},
            "member": {"type": "string", "description": "the archive member that broke a rule"},
            "rule": {"type": "string", "description": "the archive rule that was broken"},
            "limit": {"type": "number", "description": "the limit that was exceeded"},
            "limit_name": {"type": "string"},
            "state": {"type": "string", "enum": JOB_STATES},
        },
    },
    "Job": {
        "type": "object",
        "required": ["id", "state", "mode", "env", "created_at", "deadline", "owner", "private"],
        "properties": {
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "state": {"type": "string", "enum": JOB_STATES},
            "mode": {"type": "string", "enum": ["serve", "command"]},
            "env": {"type": "string"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": ["string", "null"], "format": "date-time"},
            "ended_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when the job's container stopped, as Docker recorded it, or when floydd ended the job",
            },
            "deadline": {"type": "string", "format": "date-time"},
            "reason": {"type": ["string", "null"]},
            "exit_code": {"type": ["integer", "null"]},
            "owner": {"type": ["string", "null"], "description": "the user whose token created the job"},
            "private": {"type": "boolean", "description": "whether /expose/<id> needs the owner's token"},
            "command": {"type": ["string", "null"], "description": "command mode only"},
            "endpoint": {"type": "string", "description": "serve mode only: the job's /expose URL"},
            "data": {
                "type": "array",
                "description": "the data mounts, with each dataset resolved to the version mounted",
                "items": {
                    "type": "object",
                    "required": ["mount"],
                    "properties": {
                        "dataset": {"type": "string", "description": "NAME/VERSION"},
                        "job_output": {"type": "string", "description": "the id of the job whose output is mounted"},
                        "mount": {"type": "string"},
                    },
                },
            },
            "memory_bytes": {
                "type": ["integer", "null"],
                "description": "the memory requested; null for resources.default_memory_mib",
            },
            "cpus": {
                "type": ["number", "null"],
                "description": "the CPUs requested; null for resources.default_cpus, cut to the host's CPU count",
            },
            "gpus": {"type": "integer", "description": "the number of GPUs requested"},
            "concurrency": {
                "type": "integer",
                "description": "serve mode only: requests the app gets at once, after the cap of proxy.max_concurrency",
            },
        },
    },
    "JobList": {
        "type": "object",
        "required": ["jobs"],
        "properties": {"jobs": {"type": "array", "items": ref("Job")}},
    },
    "Submission": {
        "type": "object",
        "required": ["code"],
        "properties": {
            "code": {
                "type": "string",
                "contentMediaType": "application/octet-stream",
                "description": "the project as .tar, .tar.gz or .zip; one top folder is flattened",
            },
            "mode": {"type": "string", "enum": ["serve", "command"], "default": "command"},
            "command": {"type": "string", "description": "command mode only: the shell command to run"},
            "env": {"type": "string", "description": "an environment from the config"},
            "max_uptime": {"type": "string", "description": "90, 90s, 30m, 12h or 7d", "examples": ["2h"]},
            "private": {"type": "string", "enum": ["true", "false"], "default": "false"},
            "concurrency": {
                "type": "string",
                "description": "serve mode only: a whole number of requests the app takes at once, "
                "capped by proxy.max_concurrency",
            },
            "data": {
                "type": "string",
                "description": "NAME[/VERSION]:MOUNT or jobs/<id>:MOUNT, mounted read-only at /MOUNT "
                "(input by default); send the part up to 5 times",
                "examples": ["mnist/2:input"],
            },
            "gpu": {"type": "string", "description": "whole GPUs the job gets exclusively", "examples": ["1"]},
            "memory": {
                "type": "string",
                "description": "memory limit, up to resources.max_memory_mib",
                "examples": ["512m", "8g"],
            },
            "cpus": {"type": "string", "description": "CPU limit, up to resources.max_cpus", "examples": ["1.5"]},
        },
    },
}

PATHS: dict[str, Schema] = {
    "/api/v1/jobs": {
        "get": {
            "operationId": "listJobs",
            "summary": "List jobs, newest first: the caller's own, or every job for an admin",
            "parameters": [
                {
                    "name": "state",
                    "in": "query",
                    "required": False,
                    "description": "comma-separated states to keep; the parameter may also be repeated",
                    "schema": {"type": "string", "pattern": f"^{_STATE}(,{_STATE})*$"},
                }
            ],
            "responses": {"200": json_body(ref("JobList"), "the jobs"), **error_responses(400)},
        },
        "post": {
            "operationId": "createJob",
            "summary": "Upload a project and start a job",
            "description": (
                "Send the project either as the `code` part of a multipart form with the other fields as parts, "
                "or as the whole body with an archive content type and the fields in the query string."
            ),
            "parameters": RAW_UPLOAD_PARAMETERS,
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": ref("Submission")},
                    **{
                        content_type: {"schema": {"type": "string", "contentMediaType": content_type}}
                        for content_type in sorted(ARCHIVE_TYPES)
                    },
                },
            },
            "responses": {
                "201": {
                    **json_body(ref("Job"), "the new job"),
                    "headers": {"Location": {"schema": {"type": "string"}}},
                },
                **error_responses(400, 408, 413, 417, 429, 503),
            },
        },
    },
    "/api/v1/jobs/{job_id}": {
        "parameters": [JOB_ID_PARAMETER],
        "get": {
            "operationId": "getJob",
            "summary": "Show one job",
            "responses": {"200": json_body(ref("Job"), "the job"), **error_responses(404)},
        },
    },
    "/api/v1/jobs/{job_id}/logs": {
        "parameters": [JOB_ID_PARAMETER],
        "get": {
            "operationId": "getJobLogs",
            "summary": "The job's output; with follow=true, stream it until the job ends",
            "parameters": [
                {"name": "follow", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "log lines", "content": {"text/plain": {"schema": {"type": "string"}}}},
                **error_responses(404),
            },
        },
    },
    "/api/v1/jobs/{job_id}/stop": {
        "parameters": [JOB_ID_PARAMETER],
        "post": {
            "operationId": "stopJob",
            "summary": "Stop a job and return it once its container is gone",
            "responses": {"200": json_body(ref("Job"), "the stopped job"), **error_responses(404, 409, 503)},
        },
    },
    "/api/v1/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This description",
            "responses": {"200": json_body({"type": "object"}, "the OpenAPI document"), **error_responses()},
        },
    },
}


def openapi_document() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "floydd",
            "version": __version__,
            "description": "Upload projects, run them as jobs in Docker containers, and serve them at /expose/<id>.",
        },
        "paths": PATHS,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


async def serve_openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def openapi_routes() -> list[web.RouteDef]:
    return [web.get("/api/v1/openapi.json", serve_openapi)]
