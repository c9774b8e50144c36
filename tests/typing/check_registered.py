"""Checked by ``mypy --strict`` (never run): registered tasks are typed with ParamSpec.

Every ``# type: ignore[...]`` below is proven necessary by ``warn_unused_ignores`` (part
of strict mode): if mypy stopped rejecting the line, the unused ignore would be an error.
"""

from __future__ import annotations

from background_tasks import BackgroundTaskManager, RetryPolicy, TaskHandle, TaskRegistry

manager = BackgroundTaskManager()
registry = TaskRegistry()


@manager.task(name="send_email", timeout=30, retry=RetryPolicy(max_attempts=5))
async def send_email(to: str, subject: str) -> str:
    return f"{to}: {subject}"


@manager.task
async def bare(n: int) -> int:
    return n


@manager.periodic("*/5 * * * *", name="cleanup")
async def cleanup() -> int:
    return 0


@registry.periodic(every=60, name="poll", missed="skip")
async def poll() -> None:
    pass


async def check_periodic() -> None:
    now: TaskHandle[int] = await cleanup.submit()  # run a periodic task now, by hand
    count: int = await cleanup()
    await cleanup.submit(1)  # type: ignore[call-arg]
    del now, count


async def check_submit() -> None:
    handle: TaskHandle[str] = await send_email.submit("a@example.com", subject="hi")
    result: str = await handle
    same: str = await handle.result(timeout=5)
    optioned = await send_email.options(priority=5, delay=60).submit("a@example.com", "hi")
    also: str = await optioned
    number: int = await (await bare.submit(1))
    inline: str = await send_email("a@example.com", "hi")
    by_function: str = await (await manager.submit(send_email.fn, "a", "b"))
    many: list[TaskHandle[str]] = await send_email.submit_many([{"to": "a", "subject": "b"}])
    optioned_many: list[TaskHandle[str]] = await send_email.options(priority=1).submit_many([])
    from_manager: list[TaskHandle[int]] = await manager.submit_many(bare, [{"n": 1}])
    del result, same, also, number, inline, by_function, many, optioned_many, from_manager


async def check_rejected() -> None:
    await send_email.submit(1, 2, 3)  # type: ignore[arg-type, call-arg]
    await send_email.submit("a@example.com")  # type: ignore[call-arg]
    await send_email.submit("a@example.com", subjekt="hi")  # type: ignore[call-arg]
    await send_email.options(priority=5).submit(1, 2)  # type: ignore[arg-type]
    await bare.submit("one")  # type: ignore[arg-type]
    await send_email("a", 2)  # type: ignore[arg-type]
    wrong: int = await (await send_email.submit("a", "b"))  # type: ignore[assignment]
    wrong_too: int = await (await send_email.submit("a", "b")).result()  # type: ignore[assignment]
    del wrong, wrong_too
