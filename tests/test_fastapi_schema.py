"""Property-based checks of the router against its own OpenAPI schema (schemathesis).

Whatever schemathesis generates, valid or not (malformed ids, bad statuses, huge or
negative limits and waits), the answer is never a 5xx and always matches the schema.
The app runs with its lifespan in a blocking portal, once on each anyio backend.
"""

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import schemathesis
from anyio.from_thread import start_blocking_portal
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from hypothesis import HealthCheck, settings

from background_tasks import BackgroundTaskManager
from background_tasks.fastapi import tasks_router

Send = Callable[..., httpx.Response]


def build_app() -> tuple[FastAPI, BackgroundTaskManager]:
    manager = BackgroundTaskManager(max_concurrency=2)
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(tasks_router(manager, max_limit=200, max_wait=0.05), prefix="/tasks")
    return app, manager


async def fill(manager: BackgroundTaskManager) -> None:
    """Records to list and show: completed, failed, cancelled and pending ones."""

    @manager.task(name="echo")
    async def echo(value: Any = None) -> Any:
        if value == "fail":
            raise ValueError("asked to fail")
        return value

    for value in (1, "two", {"three": [3]}, None, "fail"):
        handle = await manager.submit(echo, value)
        await handle.result(timeout=5) if value != "fail" else None
    await manager.submit(echo, 5, delay=3600)
    await manager.cancel((await manager.submit(echo, 6, delay=3600)).id)


schema = schemathesis.openapi.from_dict(build_app()[0].openapi())


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        LifespanManager(app) as running,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=running.app), base_url="http://testserver"
        ) as client,
    ):
        yield client


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def send(request: pytest.FixtureRequest) -> Iterator[Send]:
    with start_blocking_portal(backend=request.param) as portal:
        app, manager = build_app()
        with portal.wrap_async_context_manager(serve(app)) as client:
            portal.call(fill, manager)

            def send(**kwargs: Any) -> httpx.Response:
                return portal.call(partial(client.request, **kwargs))

            yield send


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_server_errors_and_answers_match_the_schema(case: schemathesis.Case, send: Send) -> None:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    assert not kwargs.pop("cookies", None)  # the schema has no cookie parameters
    response = send(**kwargs)
    assert response.status_code < 500, response.text
    case.validate_response(response)
