"""The FastAPI integration through a real ASGI app and its lifespan (no mocks)."""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations,
# and some refer to local variables.
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Header, HTTPException, Request

from background_tasks import (
    BackgroundTaskManager,
    RetryPolicy,
    TaskRecord,
    TaskStatus,
    current_task,
)
from background_tasks.fastapi import (
    MANAGER_STATE_KEY,
    RedactedTaskRecordOut,
    TaskRecordOut,
    combine_lifespans,
    get_manager,
    manager_dependency,
    tasks_router,
)

pytestmark = pytest.mark.anyio


BASE = "http://testserver"


def make_app(manager: BackgroundTaskManager, **router_options: Any) -> FastAPI:
    app = FastAPI(lifespan=manager.lifespan)
    app.include_router(tasks_router(manager, **router_options), prefix="/tasks")
    return app


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan running, and a client that talks to it in-process."""
    async with (
        LifespanManager(app) as running,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=running.app), base_url=BASE) as client,
    ):
        yield client


class Gate:
    """Tasks that block until the test lets them go (events made inside the test's loop)."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()


def register_tasks(manager: BackgroundTaskManager, gate: Gate) -> dict[str, Any]:
    @manager.task(name="gated")
    async def gated(value: int, *, secret: str = "") -> int:
        gate.started.set()
        await gate.release.wait()
        return value * 2

    @manager.task(name="progress")
    async def progress() -> str:
        await current_task().report_progress(0.25, "a quarter done")
        gate.started.set()
        await gate.release.wait()
        return "done"

    @manager.task(name="quick")
    async def quick(value: Any = None) -> Any:
        return value

    @manager.task(name="broken", retry=RetryPolicy(max_attempts=1))
    async def broken() -> None:
        raise ValueError("it broke")

    return {"gated": gated, "progress": progress, "quick": quick, "broken": broken}


async def wait_for_status(
    client: httpx.AsyncClient, task_id: str, status: str, *, prefix: str = "/tasks"
) -> dict[str, Any]:
    with anyio.fail_after(5):
        while True:
            response = await client.get(f"{prefix}/{task_id}")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] == status:
                return body
            await anyio.sleep(0.01)


@pytest.fixture
def manager() -> BackgroundTaskManager:
    return BackgroundTaskManager(max_concurrency=4)


# --- list -----------------------------------------------------------------------------


async def test_list_is_newest_first_and_filters(manager: BackgroundTaskManager) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    async with serve(make_app(manager)) as client:
        assert (await client.get("/tasks")).json() == []
        done = [await manager.submit(tasks["quick"], i) for i in range(3)]
        for handle in done:
            await handle
        failed = await manager.submit(tasks["broken"], queue="default")
        with pytest.raises(Exception, match="it broke"):
            await failed

        response = await client.get("/tasks")
        assert response.status_code == 200
        ids = [record["id"] for record in response.json()]
        assert ids == [failed.id, *reversed([h.id for h in done])]

        for spelling in ("failed", "FAILED", "Failed"):
            response = await client.get("/tasks", params={"status": spelling})
            assert response.status_code == 200, response.text
            assert [r["id"] for r in response.json()] == [failed.id]
        completed = await client.get("/tasks", params={"status": "completed"})
        assert {r["id"] for r in completed.json()} == {h.id for h in done}

        by_name = await client.get("/tasks", params={"name": "quick"})
        assert {r["id"] for r in by_name.json()} == {h.id for h in done}
        assert (await client.get("/tasks", params={"queue": "nope"})).json() == []
        assert len((await client.get("/tasks", params={"queue": "default"})).json()) == 4

        limited = await client.get("/tasks", params={"limit": 2})
        assert [r["id"] for r in limited.json()] == ids[:2]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": -1},
        {"limit": 51},
        {"limit": 10**30},
        {"limit": "ten"},
        {"limit": 1.5},
        {"status": "finished"},
        {"status": ""},
    ],
)
async def test_list_rejects_bad_queries_with_422(
    manager: BackgroundTaskManager, params: dict[str, Any]
) -> None:
    async with serve(make_app(manager, max_limit=50)) as client:
        response = await client.get("/tasks", params=params)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][0] == "query"
        assert (await client.get("/tasks", params={"limit": 50})).status_code == 200


# --- get and wait ---------------------------------------------------------------------


async def test_get_one_and_unknown(manager: BackgroundTaskManager) -> None:
    tasks = register_tasks(manager, Gate())
    async with serve(make_app(manager)) as client:
        handle = await manager.submit(tasks["quick"], {"x": [1, 2]}, key="k1")
        assert await handle == {"x": [1, 2]}
        response = await client.get(f"/tasks/{handle.id}")
        assert response.status_code == 200
        body = response.json()
        record = await manager.get(handle.id)
        assert record is not None
        assert body == TaskRecordOut.model_validate(body).model_dump(mode="json")
        assert body["id"] == handle.id
        assert body["name"] == "quick"
        assert body["status"] == "completed"
        assert body["args"] == [{"x": [1, 2]}]
        assert body["kwargs"] == {}
        assert body["key"] == "k1"
        assert body["result"] == {"x": [1, 2]}
        assert body["attempts"] == 1
        assert body["created_at"] <= body["started_at"] <= body["finished_at"]

        for bad in ("nope", "00000000", "%20", "a" * 500, "..%2F..%2Fetc"):
            response = await client.get(f"/tasks/{bad}")
            assert response.status_code == 404, bad
        assert "no task with id 'nope'" in (await client.get("/tasks/nope")).json()["detail"]


async def test_values_json_cannot_hold_are_shown_as_repr(manager: BackgroundTaskManager) -> None:
    """Without a journal, any Python value can be an argument or a result: never a 500."""
    tasks = register_tasks(manager, Gate())
    async with serve(make_app(manager)) as client:
        handle = await manager.submit(tasks["quick"], {1, 2}.__class__)  # a type, not JSON
        await handle
        body = (await client.get(f"/tasks/{handle.id}")).json()
        assert body["args"] == [repr(set)]
        assert body["result"] == repr(set)
        nan = await manager.submit(tasks["quick"], math.nan)
        await nan
        assert (await client.get(f"/tasks/{nan.id}")).status_code == 200
        for odd in (b"\xff\xfe", "a\udc80b"):  # not UTF-8; a lone surrogate
            handle = await manager.submit(tasks["quick"], odd)
            await handle
            response = await client.get(f"/tasks/{handle.id}")
            assert response.status_code == 200
            assert response.json()["args"] == [repr(odd)]
            listed = await client.get("/tasks")
            assert listed.status_code == 200


async def test_wait_returns_when_the_task_finishes(manager: BackgroundTaskManager) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    async with serve(make_app(manager)) as client:
        handle = await manager.submit(tasks["gated"], 21)
        await gate.started.wait()

        # The wait runs out: the record as it is, still running, after about the wait.
        start = anyio.current_time()
        response = await client.get(f"/tasks/{handle.id}", params={"wait": 0.2})
        assert 0.15 <= anyio.current_time() - start < 2
        assert response.status_code == 200
        assert response.json()["status"] == "running"

        # The task finishes during the wait: the answer comes at once, with the result.
        async def release_soon() -> None:
            await anyio.sleep(0.1)
            gate.release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(release_soon)
            start = anyio.current_time()
            response = await client.get(f"/tasks/{handle.id}", params={"wait": 30})
            assert anyio.current_time() - start < 5
        assert response.json()["status"] == "completed"
        assert response.json()["result"] == 42

        # Finished already (or wait=0): no waiting at all.
        start = anyio.current_time()
        assert (await client.get(f"/tasks/{handle.id}?wait=30")).json()["result"] == 42
        assert (await client.get(f"/tasks/{handle.id}?wait=0")).json()["result"] == 42
        assert anyio.current_time() - start < 1


async def test_wait_ends_with_a_failed_or_cancelled_record(
    manager: BackgroundTaskManager,
) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    async with serve(make_app(manager)) as client:
        handle = await manager.submit(tasks["gated"], 1)
        await gate.started.wait()

        async def cancel_soon() -> None:
            await anyio.sleep(0.1)
            await manager.cancel(handle.id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_soon)
            response = await client.get(f"/tasks/{handle.id}", params={"wait": 30})
        assert response.json()["status"] == "cancelled"

        failed = await manager.submit(tasks["broken"])
        response = await client.get(f"/tasks/{failed.id}", params={"wait": 30})
        body = response.json()
        assert body["status"] == "failed"
        assert body["error"]["type"] == "ValueError"
        assert body["error"]["message"] == "it broke"


@pytest.mark.parametrize("wait", ["-1", "61", "inf", "nan", "soon", "1e400"])
async def test_wait_is_bounded(manager: BackgroundTaskManager, wait: str) -> None:
    tasks = register_tasks(manager, Gate())
    async with serve(make_app(manager, max_wait=60)) as client:
        handle = await manager.submit(tasks["quick"])
        await handle
        response = await client.get(f"/tasks/{handle.id}", params={"wait": wait})
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["query", "wait"]
        assert (await client.get(f"/tasks/{handle.id}?wait=60")).status_code == 200


async def test_a_client_that_gives_up_waiting_does_not_cancel_the_task(
    manager: BackgroundTaskManager,
) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    async with serve(make_app(manager)) as client:
        handle = await manager.submit(tasks["gated"], 5)
        await gate.started.wait()
        # The ASGI transport runs the app in the caller's task: cancelling the caller
        # cancels the endpoint in the middle of its wait, as a server would.
        with anyio.move_on_after(0.2) as scope:
            await client.get(f"/tasks/{handle.id}", params={"wait": 30})
        assert scope.cancelled_caught
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is TaskStatus.RUNNING
        gate.release.set()
        assert await handle.result(timeout=5) == 10
        assert (await wait_for_status(client, handle.id, "completed"))["result"] == 10


async def test_a_disconnected_client_ends_the_wait_but_not_the_task(
    manager: BackgroundTaskManager,
) -> None:
    """Speak raw ASGI: the client sends ``http.disconnect`` while the endpoint waits."""
    gate = Gate()
    tasks = register_tasks(manager, gate)
    app = make_app(manager)
    async with LifespanManager(app) as running:
        handle = await manager.submit(tasks["gated"], 4)
        await gate.started.wait()
        messages: list[Mapping[str, Any]] = []
        disconnect = anyio.Event()

        async def receive() -> dict[str, Any]:
            if not messages:
                messages.append({"type": "http.request"})
                return {"type": "http.request", "body": b"", "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: Mapping[str, Any]) -> None:
            messages.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/tasks/{handle.id}",
            "raw_path": f"/tasks/{handle.id}".encode(),
            "root_path": "",
            "query_string": b"wait=30",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
            "state": dict(running._state),
        }

        async def disconnect_soon() -> None:
            await anyio.sleep(0.1)
            disconnect.set()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(disconnect_soon)
                await running.app(scope, receive, send)
        record = await manager.get(handle.id)
        assert record is not None
        assert record.status is TaskStatus.RUNNING
        gate.release.set()
        assert await handle.result(timeout=5) == 8


# --- cancel and requeue ---------------------------------------------------------------


async def test_cancel(manager: BackgroundTaskManager) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    async with serve(make_app(manager)) as client:
        handle = await manager.submit(tasks["gated"], 1)
        await gate.started.wait()
        response = await client.post(f"/tasks/{handle.id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["id"] == handle.id
        assert response.json()["status"] in {"running", "cancelled"}
        await wait_for_status(client, handle.id, "cancelled")

        again = await client.post(f"/tasks/{handle.id}/cancel")
        assert again.status_code == 409
        assert "already finished (cancelled)" in again.json()["detail"]

        delayed = await manager.submit(tasks["quick"], delay=60)
        response = await client.post(f"/tasks/{delayed.id}/cancel")
        assert response.status_code == 202
        assert response.json()["status"] == "cancelled"

        done = await manager.submit(tasks["quick"])
        await done
        response = await client.post(f"/tasks/{done.id}/cancel")
        assert response.status_code == 409
        assert "completed" in response.json()["detail"]

        assert (await client.post("/tasks/unknown/cancel")).status_code == 404
        assert (await client.get(f"/tasks/{handle.id}/cancel")).status_code == 405


async def test_requeue(manager: BackgroundTaskManager) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    async with serve(make_app(manager)) as client:
        failed = await manager.submit(tasks["broken"])
        await wait_for_status(client, failed.id, "failed")
        response = await client.post(f"/tasks/{failed.id}/requeue")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "pending"
        assert body["error"] is None
        body = await wait_for_status(client, failed.id, "failed")
        assert body["error"]["message"] == "it broke"

        cancelled = await manager.submit(tasks["quick"], "again", delay=60)
        await manager.cancel(cancelled.id)
        response = await client.post(f"/tasks/{cancelled.id}/requeue")
        assert response.status_code == 200
        assert response.json()["status"] == "pending"

        done = await manager.submit(tasks["quick"])
        await done
        response = await client.post(f"/tasks/{done.id}/requeue")
        assert response.status_code == 409
        assert response.json()["detail"]

        assert (await client.post("/tasks/unknown/requeue")).status_code == 404


# --- progress, arguments, authentication ------------------------------------------------


async def test_progress_is_visible(manager: BackgroundTaskManager) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    async with serve(make_app(manager)) as client:
        handle = await manager.submit(tasks["progress"])
        await gate.started.wait()
        body = (await client.get(f"/tasks/{handle.id}")).json()
        assert body["status"] == "running"
        assert body["progress"]["fraction"] == 0.25
        assert body["progress"]["message"] == "a quarter done"
        assert body["progress"]["updated_at"] >= body["started_at"]
        listed = (await client.get("/tasks", params={"status": "running"})).json()
        assert listed[0]["progress"]["message"] == "a quarter done"
        gate.release.set()
        await handle


async def test_include_args_false_hides_arguments(manager: BackgroundTaskManager) -> None:
    gate = Gate()
    tasks = register_tasks(manager, gate)
    gate.release.set()
    async with serve(make_app(manager, include_args=False)) as client:
        handle = await manager.submit(tasks["gated"], 1, kwargs={"secret": "hunter2"})
        await handle
        for response in (
            await client.get(f"/tasks/{handle.id}"),
            await client.get(f"/tasks/{handle.id}?wait=1"),
            await client.get("/tasks"),
        ):
            assert response.status_code == 200
            assert "hunter2" not in response.text
            assert "args" not in response.text
        schema = (await client.get("/openapi.json")).text
        assert '"args"' not in schema
        assert '"kwargs"' not in schema


def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
    if authorization is None:
        raise HTTPException(401, "missing token", headers={"WWW-Authenticate": "Bearer"})
    if authorization != "Bearer s3cret":
        raise HTTPException(403, "wrong token")


async def test_dependencies_guard_every_route(manager: BackgroundTaskManager) -> None:
    tasks = register_tasks(manager, Gate())
    app = make_app(manager, dependencies=[Depends(require_token)])
    async with serve(app) as client:
        handle = await manager.submit(tasks["quick"])
        await handle
        routes = [
            ("GET", "/tasks"),
            ("GET", "/tasks/stats"),
            ("GET", f"/tasks/{handle.id}"),
            ("GET", f"/tasks/{handle.id}?wait=1"),
            ("POST", f"/tasks/{handle.id}/cancel"),
            ("POST", f"/tasks/{handle.id}/requeue"),
            ("GET", "/tasks/unknown"),  # 401 before 404: no probing for ids
        ]
        for method, url in routes:
            response = await client.request(method, url)
            assert response.status_code == 401, (method, url)
            assert response.headers["www-authenticate"] == "Bearer"
            response = await client.request(method, url, headers={"Authorization": "x"})
            assert response.status_code == 403, (method, url)
        good = {"Authorization": "Bearer s3cret"}
        assert (await client.get("/tasks", headers=good)).status_code == 200
        assert (await client.get(f"/tasks/{handle.id}", headers=good)).status_code == 200
        response = await client.post(f"/tasks/{handle.id}/cancel", headers=good)
        assert response.status_code == 409


# --- the manager as a dependency, and lifespans -------------------------------------------


async def test_503_when_the_lifespan_never_ran(manager: BackgroundTaskManager) -> None:
    app = FastAPI()  # no lifespan=manager.lifespan
    given_manager = manager_dependency(manager)
    app.include_router(tasks_router(manager), prefix="/tasks")

    @app.get("/found")
    async def found(tasks: Annotated[BackgroundTaskManager, Depends(get_manager)]) -> str:
        return "unreachable"

    @app.get("/given")
    async def given(tasks: Annotated[BackgroundTaskManager, Depends(given_manager)]) -> str:
        return "unreachable"

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        for url in ("/tasks", "/tasks/some-id", "/found", "/given"):
            response = await client.get(url)
            assert response.status_code == 503, url
            assert "lifespan=manager.lifespan" in response.json()["detail"]
        assert (await client.post("/tasks/x/cancel")).status_code == 503


async def test_503_after_the_manager_has_shut_down(manager: BackgroundTaskManager) -> None:
    app = make_app(manager)
    async with serve(app) as client:
        assert (await client.get("/tasks")).status_code == 200
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
        assert (await client.get("/tasks")).status_code == 503


async def test_get_manager_and_manager_dependency_hand_out_the_running_manager(
    manager: BackgroundTaskManager,
) -> None:
    tasks = register_tasks(manager, Gate())
    app = make_app(manager)

    @app.post("/found", status_code=202)
    async def found(tasks_: Annotated[BackgroundTaskManager, Depends(get_manager)]) -> str:
        assert tasks_ is manager
        return (await tasks_.submit(tasks["quick"], "found")).id

    given_manager = manager_dependency(manager)

    @app.post("/given", status_code=202)
    async def given(tasks_: Annotated[BackgroundTaskManager, Depends(given_manager)]) -> str:
        return (await tasks_.submit(tasks["quick"], "given")).id

    async with serve(app) as client:
        for url in ("/found", "/given"):
            response = await client.post(url)
            assert response.status_code == 202
            body = await wait_for_status(client, response.json(), "completed")
            assert body["result"] == url[1:]


async def test_get_manager_finds_a_manager_in_the_lifespan_state() -> None:
    """An app factory can start its manager in its own lifespan and yield it as state."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with BackgroundTaskManager() as manager:
            yield {MANAGER_STATE_KEY: manager}

    async def double(x: int) -> int:
        return 2 * x

    app = FastAPI(lifespan=lifespan)

    @app.post("/double/{x}")
    async def submit(x: int, tasks: Annotated[BackgroundTaskManager, Depends(get_manager)]) -> int:
        return int(await (await tasks.submit(double, x)))

    async with serve(app) as client:
        assert (await client.post("/double/21")).json() == 42


async def test_combine_lifespans_orders_and_merges(manager: BackgroundTaskManager) -> None:
    events: list[str] = []

    def named(name: str, state: dict[str, Any] | None) -> Callable[[FastAPI], Any]:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any] | None]:
            events.append(f"enter {name}, manager running: {manager.running}")
            yield state
            events.append(f"exit {name}, manager running: {manager.running}")

        return lifespan

    app = FastAPI(
        lifespan=combine_lifespans(
            named("db", {"db": "pool", "shared": 1}), manager.lifespan, named("cache", None)
        )
    )
    app.include_router(tasks_router(manager), prefix="/tasks")

    async with serve(app) as client:
        assert (await client.get("/tasks")).status_code == 200
    assert events == [
        "enter db, manager running: False",
        "enter cache, manager running: True",
        "exit cache, manager running: True",
        "exit db, manager running: False",
    ]


async def test_combine_lifespans_state_reaches_requests(manager: BackgroundTaskManager) -> None:
    @asynccontextmanager
    async def first(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"db": "pool", "shared": 1}

    @asynccontextmanager
    async def second(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"shared": 2}

    app = FastAPI(lifespan=combine_lifespans(first, manager.lifespan, second))

    @app.get("/state")
    async def state(request: Request) -> dict[str, Any]:
        assert manager.running
        return {"db": request.state.db, "shared": request.state.shared}

    async with serve(app) as client:
        assert (await client.get("/state")).json() == {"db": "pool", "shared": 2}


async def test_combine_lifespans_exits_what_started_when_one_fails(
    manager: BackgroundTaskManager,
) -> None:
    @asynccontextmanager
    async def broken(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("cannot open the cache")
        yield  # pragma: no cover

    lifespan = combine_lifespans(manager.lifespan, broken)
    with pytest.raises(RuntimeError, match="cannot open the cache"):
        async with lifespan(FastAPI()):
            pass  # pragma: no cover
    assert not manager.running


def test_combine_lifespans_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one"):
        combine_lifespans()
    with pytest.raises(TypeError, match="callable"):
        combine_lifespans(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options", [{"max_limit": 0}, {"max_limit": 1.5}, {"max_wait": -1}, {"max_wait": math.inf}]
)
def test_tasks_router_rejects_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="max_"):
        tasks_router(BackgroundTaskManager(), **options)


# --- the OpenAPI schema -------------------------------------------------------------------


def test_response_models_mirror_task_record() -> None:
    fields = set(TaskRecord.model_fields)
    assert set(TaskRecordOut.model_fields) == fields
    assert set(RedactedTaskRecordOut.model_fields) == fields - {"args", "kwargs"}


async def test_openapi_schema_is_exact(manager: BackgroundTaskManager) -> None:
    async with serve(make_app(manager, max_limit=500, max_wait=20)) as client:
        schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) == {
        "/tasks",
        "/tasks/stats",
        "/tasks/{task_id}",
        "/tasks/{task_id}/cancel",
        "/tasks/{task_id}/requeue",
    }
    listing = paths["/tasks"]["get"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"] == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/TaskRecordOut"},
        "title": "Response List Tasks Tasks Get",
    }
    params = {p["name"]: p["schema"] for p in listing["parameters"]}
    assert params["limit"]["maximum"] == 500
    assert params["limit"]["minimum"] == 1
    status_values = [TaskStatus(s).value for s in TaskStatus]
    status_schema = params["status"]["anyOf"][0]
    assert schema["components"]["schemas"]["TaskStatus"]["enum"] == status_values
    assert status_schema == {"$ref": "#/components/schemas/TaskStatus"}
    wait = {p["name"]: p["schema"] for p in paths["/tasks/{task_id}"]["get"]["parameters"]}
    assert wait["wait"]["anyOf"][0]["maximum"] == 20
    cancel = paths["/tasks/{task_id}/cancel"]["post"]["responses"]
    assert set(cancel) == {"202", "404", "409", "422", "503"}
    requeue = paths["/tasks/{task_id}/requeue"]["post"]["responses"]
    assert set(requeue) == {"200", "404", "409", "422", "503"}
    record = schema["components"]["schemas"]["TaskRecordOut"]
    assert set(record["properties"]) == set(TaskRecord.model_fields)
    assert {"ErrorInfo", "Progress", "ErrorResponse"} <= set(schema["components"]["schemas"])


async def test_stats_show_counts_and_each_queue() -> None:
    manager = BackgroundTaskManager(max_concurrency=2, queues={"q": 1})
    gate = anyio.Event()

    async def wait() -> None:
        await gate.wait()

    async with serve(make_app(manager)) as client:
        first = await manager.submit(wait, queue="q")
        second = await manager.submit(wait, queue="q")
        locked = [await manager.submit(wait, lock="L") for _ in range(2)]
        await anyio.sleep(0.05)
        body = (await client.get("/tasks/stats")).json()
        gate.set()
        for handle in [first, second, *locked]:
            await handle
    assert body["running"] == 2
    assert body["queues"]["q"] == {
        "running": 1, "ready": 0, "waiting_on_limit": 1, "waiting_on_lock": 0,
    }  # fmt: skip
    assert body["queues"]["default"] == {
        "running": 1, "ready": 0, "waiting_on_limit": 0, "waiting_on_lock": 1,
    }  # fmt: skip
