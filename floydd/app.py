"""Wiring: build the aiohttp application and own the lifetime of its resources."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from aiohttp import web

from floydd.admission import guard_routes, unknown_api_routes
from floydd.api import JobsApi, error_middleware
from floydd.auth import AUTHENTICATOR, Authenticator, TokenStore, auth_middleware
from floydd.config import Settings
from floydd.dataapi import DataApi
from floydd.metrics import ProxyMetrics
from floydd.openapi import openapi_routes
from floydd.proxy import Proxy, no_automatic_continue
from floydd.queue import QueueRegistry
from floydd.runtime import DockerRuntime
from floydd.store import JobStore
from floydd.supervisor import Supervisor

log = structlog.get_logger(__name__)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", JobStore)
RUNTIME = web.AppKey("runtime", DockerRuntime)
QUEUES = web.AppKey("queues", QueueRegistry)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
PROXY = web.AppKey("proxy", Proxy)
METRICS = web.AppKey("metrics", ProxyMetrics)


def build_app(settings: Settings) -> web.Application:
    """Create the application; its resources open in `_lifetime` when it starts."""
    store = JobStore(settings.state_path / "floydd.sqlite3")
    runtime = DockerRuntime(settings.docker, instance_id(settings.state_path))
    queues = QueueRegistry(settings.proxy.max_queue_depth, preconnect=settings.proxy.preconnect)
    supervisor = Supervisor(settings, store, runtime, queues)

    # error_middleware comes first so that auth_middleware's 401 becomes JSON.
    app = web.Application(middlewares=[error_middleware, auth_middleware])
    app[AUTHENTICATOR] = Authenticator(TokenStore(store), store)
    app[SETTINGS], app[STORE], app[RUNTIME], app[QUEUES], app[SUPERVISOR] = (
        settings,
        store,
        runtime,
        queues,
        supervisor,
    )
    api = JobsApi(settings, supervisor, runtime, store)
    metrics = ProxyMetrics(queues, store)
    proxy = Proxy(settings.proxy, queues, store, metrics, settings.state_path / "spool")
    app[PROXY], app[METRICS] = proxy, metrics
    # Every /api route, the catch-all for unknown ones included, authenticates before `100 Continue`.
    app.router.add_routes(guard_routes(api.routes()))
    app.router.add_routes(guard_routes(openapi_routes()))
    app.router.add_routes(unknown_api_routes())
    app.router.add_routes(guard_routes(DataApi(settings, supervisor).routes()))
    app.router.add_get("/metrics", metrics.handle)
    for path in ("/expose/{job_id}", "/expose/{job_id}/{tail:.*}"):
        app.router.add_route("*", path, proxy.handle, expect_handler=no_automatic_continue)
    app.cleanup_ctx.append(_lifetime)
    return app


def instance_id(state_path: Path) -> str:
    """Return this state directory's instance id, creating it on first use."""
    path = state_path / "instance-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        state_path.mkdir(parents=True, exist_ok=True)
        identifier = secrets.token_hex(8)
        path.write_text(identifier + "\n")
        return identifier


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    settings, store, runtime, supervisor = app[SETTINGS], app[STORE], app[RUNTIME], app[SUPERVISOR]
    settings.state_path.mkdir(parents=True, exist_ok=True)

    # Start-up: the database, then the Docker engine, then adopt what the last run left.
    await store.open()
    try:
        await runtime.open()
        await supervisor.start()
    except BaseException:
        await runtime.close()
        await store.close()
        raise
    log.info("floydd_started", state_dir=str(settings.state_path), base_url=settings.base_url())

    yield

    # Shutdown: stop supervising (containers keep running), then release resources.
    await supervisor.close()
    await runtime.close()
    await store.close()
    log.info("floydd_stopped")
