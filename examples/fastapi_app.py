"""Accept a request, answer 202 with a status URL, let the client poll or wait.

Run it (from the repository root)::

    uvicorn examples.fastapi_app:app                       # tasks kept in memory
    BGTASKS_JOURNAL=tasks.db uvicorn examples.fastapi_app:app   # tasks survive restarts

then::

    curl -i -X POST localhost:8000/reports -H 'content-type: application/json' -d '{"pages": 5}'
    curl localhost:8000/tasks/<id>            # poll: status and progress
    curl 'localhost:8000/tasks/<id>?wait=10'  # or wait up to 10 s for the outcome
    curl -X POST localhost:8000/sync -H 'content-type: application/json' -d '{"fail_times": 2}'
    curl 'localhost:8000/tasks?status=completed'

Environment: ``BGTASKS_JOURNAL`` (a SQLite file; default: in memory),
``EXAMPLE_PAGE_SECONDS`` (time per report page, default 0.5),
``EXAMPLE_SHUTDOWN_TIMEOUT`` (seconds running tasks get at shutdown, default 10).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Request, Response
from pydantic import BaseModel, Field

from background_tasks import BackgroundTaskManager, RetryPolicy, SQLiteJournal, current_task
from background_tasks.fastapi import combine_lifespans, manager_dependency, tasks_router

log = logging.getLogger("examples.fastapi_app")

_journal_path = os.environ.get("BGTASKS_JOURNAL")
PAGE_SECONDS = float(os.environ.get("EXAMPLE_PAGE_SECONDS", "0.5"))

manager = BackgroundTaskManager(
    max_concurrency=4,
    journal=SQLiteJournal(_journal_path) if _journal_path else None,
    shutdown_timeout=float(os.environ.get("EXAMPLE_SHUTDOWN_TIMEOUT", "10")),
)


# --- the tasks: registered by name, so a journal can run them again after a restart ---


@manager.task(name="build_report", timeout=300)
async def build_report(pages: int) -> dict[str, Any]:
    """A slow task that says how far it has got."""
    ctx = current_task()
    for page in range(1, pages + 1):
        await anyio.sleep(PAGE_SECONDS)  # render one page
        await ctx.report_progress(page / pages, f"rendered page {page} of {pages}")
    return {"pages": pages, "download": f"/reports/{ctx.id}.pdf"}


@manager.task(
    name="sync_inventory",
    retry=RetryPolicy(max_attempts=4, base_delay=0.5, multiplier=2.0, jitter=False),
)
async def sync_inventory(fail_times: int) -> str:
    """A flaky task: its upstream fails the first ``fail_times`` attempts."""
    attempt = current_task().attempt
    if attempt <= fail_times:
        raise ConnectionError(f"inventory service unavailable (attempt {attempt})")
    return f"inventory synced on attempt {attempt}"


# --- the app: its own lifespan combined with the manager's ---------------------------


@asynccontextmanager
async def app_resources(app: FastAPI) -> AsyncIterator[None]:
    # Open what the tasks use here (database pools, HTTP clients). It is listed before
    # manager.lifespan, so at shutdown running tasks finish before these are closed.
    log.info("resources opened")
    yield
    log.info("resources closed")


app = FastAPI(
    title="background_tasks example",
    lifespan=combine_lifespans(app_resources, manager.lifespan),
)
app.include_router(tasks_router(manager), prefix="/tasks", tags=["tasks"])

# The running manager for an endpoint (503 with a clear message if the lifespan never ran).
Manager = Annotated[BackgroundTaskManager, Depends(manager_dependency(manager))]


class Accepted(BaseModel):
    id: str
    status_url: str


class ReportRequest(BaseModel):
    pages: int = Field(ge=1, le=100)


class SyncRequest(BaseModel):
    fail_times: int = Field(default=0, ge=0, le=10)


def accepted(request: Request, response: Response, task_id: str) -> Accepted:
    """202 Accepted with a Location header pointing at the task's status."""
    url = str(request.url_for("get_task", task_id=task_id))
    response.headers["Location"] = url
    return Accepted(id=task_id, status_url=url)


@app.post("/reports", status_code=202, response_model=Accepted)
async def create_report(
    body: ReportRequest, request: Request, response: Response, tasks: Manager
) -> Accepted:
    handle = await tasks.submit(build_report, body.pages)
    return accepted(request, response, handle.id)


@app.post("/sync", status_code=202, response_model=Accepted)
async def start_sync(
    body: SyncRequest, request: Request, response: Response, tasks: Manager
) -> Accepted:
    handle = await tasks.submit(sync_inventory, body.fail_times)
    return accepted(request, response, handle.id)
