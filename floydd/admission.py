"""Admission of API requests before their body is read: tokens, per-user limits, `Expect`.

aiohttp handles `Expect: 100-continue` in the route's expect handler, which
runs before any middleware. Its default handler sends `100 Continue` at once,
so a client would upload its whole body only to learn that its token is wrong
or its upload too large. Every `/api` route gets `expect_handler` here instead:
it authenticates, checks the route's limits, and only then sends
`100 Continue`; otherwise it sends the final 4xx and closes the connection.
Unknown `/api` paths go to a catch-all route with the same handler, so they
also get their 401, 404 or 405 before the body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import NoReturn

from aiohttp import web

from floydd.auth import AUTHENTICATOR, User, needs_token
from floydd.config import Settings
from floydd.errors import FloyddError, PayloadTooLarge, TooManyRequests
from floydd.store import JobStore

Admit = Callable[[web.Request], Awaitable[None]]
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def upload_limit(settings: Settings, user: User) -> int:
    """Return the largest upload `user` may send, in bytes."""
    if user.is_admin:
        return settings.uploads.max_upload_bytes
    return min(settings.uploads.max_upload_bytes, settings.limits.max_upload_bytes)


def check_upload_size(settings: Settings, user: User, content_length: int | None) -> None:
    """Raise 413 when a declared body length exceeds the user's upload limit."""
    limit = upload_limit(settings, user)
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(
            f"upload of {content_length} bytes exceeds the limit of {limit} bytes", limit=limit, limit_name="upload"
        )


async def check_running_jobs(settings: Settings, store: JobStore, user: User) -> None:
    """Raise 429 when `user` already has as many unfinished jobs as allowed."""
    if user.is_admin:
        return
    limit = settings.limits.max_running_jobs
    running = await store.count_unfinished(user.name)
    if running >= limit:
        raise TooManyRequests(
            f"user {user.name!r} has {running} unfinished jobs, the limit is {limit}; stop one or wait for one to end",
            limit=limit,
            limit_name="running_jobs",
        )


def check_dataset_quota(settings: Settings, user: User, current_bytes: int, added_bytes: int) -> None:
    """Raise 413 when adding `added_bytes` would take the user's datasets over their total limit."""
    if user.is_admin:
        return
    limit = settings.limits.max_dataset_bytes
    if current_bytes + added_bytes > limit:
        raise PayloadTooLarge(
            f"datasets of user {user.name!r} would take {current_bytes + added_bytes} bytes, "
            f"over the limit of {limit} bytes; delete a dataset first",
            limit=limit,
            limit_name="datasets",
        )


def error_response(exc: FloyddError) -> web.Response:
    """Build the JSON error response that `api.error_middleware` would send, closing the connection."""
    response = web.json_response(exc.to_json(), status=exc.status, headers=exc.headers)
    # The client may still send the body after this response; it must not be parsed as the next request.
    response.force_close()
    return response


def expect_handler(admit: Admit | None = None) -> ExpectHandler:
    """Build an expect handler that authenticates and runs `admit` before `100 Continue`."""

    async def handle(request: web.Request) -> web.StreamResponse | None:
        try:
            await request.app[AUTHENTICATOR].authenticate(request)
            if admit is not None:
                await admit(request)
        except FloyddError as exc:
            return error_response(exc)
        except web.HTTPException as exc:
            return _http_error_response(exc)
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return error_response(_ExpectationFailed(f"unsupported Expect header {expect!r}; use 100-continue"))
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # The interim response is not part of the final response's size.
            request.writer.output_size = 0
        return None

    return handle


class _ExpectationFailed(FloyddError):
    status = 417
    code = "expectation_failed"


def guard_routes(routes: Iterable[web.RouteDef], admit: Admit | None = None) -> list[web.RouteDef]:
    """Give every `/api` route that has no expect handler of its own the authenticating one."""
    guarded = []
    for route in routes:
        kwargs = dict(route.kwargs)
        if needs_token(route.path):
            kwargs.setdefault("expect_handler", expect_handler(admit))
        guarded.append(web.RouteDef(route.method, route.path, route.handler, kwargs))
    return guarded


def unknown_api_routes() -> list[web.RouteDef]:
    """Return the catch-all route for `/api` paths that no other route matches."""
    return [
        web.route("*", "/api", unknown_api_path, expect_handler=expect_handler(_raise_route_error)),
        web.route("*", "/api/{tail:.*}", unknown_api_path, expect_handler=expect_handler(_raise_route_error)),
    ]


async def unknown_api_path(request: web.Request) -> NoReturn:
    await _raise_route_error(request)
    raise AssertionError("_raise_route_error always raises")


async def _raise_route_error(request: web.Request) -> None:
    """Raise the 405 or 404 that aiohttp's router would give without the catch-all route."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if any(route.handler is unknown_api_path for route in resource):
            continue
        match, methods = await resource.resolve(request)
        if match is None:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _http_error_response(exc: web.HTTPException) -> web.Response:
    code = exc.reason.lower().replace(" ", "_")
    headers = {name: value for name, value in exc.headers.items() if name.lower() == "allow"}
    response = web.json_response({"error": code, "detail": exc.text or exc.reason}, status=exc.status, headers=headers)
    response.force_close()
    return response
