"""Registered tasks, standalone registries, and how timeouts and retries are inherited."""

from __future__ import annotations

import math
from datetime import timedelta

import anyio
import pytest
from support import noop

from background_tasks import (
    BackgroundTaskManager,
    RegisteredTask,
    RetryPolicy,
    TaskFailed,
    TaskRegistry,
    TaskStatus,
    TaskTimeoutError,
)

pytestmark = pytest.mark.anyio


async def sleepy(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "woke"


# ------------------------------------------------------------------ @manager.task


async def test_registered_task_every_way_of_submitting() -> None:
    manager = BackgroundTaskManager()

    @manager.task(name="send_email", timeout=30, retry=RetryPolicy(max_attempts=5))
    async def send_email(to: str, subject: str) -> str:
        return f"{to}:{subject}"

    assert isinstance(send_email, RegisteredTask)
    assert send_email.name == "send_email"
    assert "send_email" in repr(send_email)
    async with manager:
        h1 = await send_email.submit("a@example.com", subject="hi")
        h2 = await send_email.options(priority=5, delay=0.01).submit("b@example.com", "yo")
        h3 = await manager.submit(send_email, "c@example.com", kwargs={"subject": "s"})
        h4 = await manager.submit("send_email", "d@example.com", kwargs={"subject": "t"})
        assert await h1 == "a@example.com:hi"
        assert await h2 == "b@example.com:yo"
        assert await h3 == "c@example.com:s"
        assert await h4 == "d@example.com:t"
        records = {h.id: await manager.get(h.id) for h in (h1, h2, h3, h4)}
    for record in records.values():
        assert record is not None
        assert record.name == "send_email"
        assert record.max_attempts == 5
        assert record.timeout == 30
    r1, r2 = records[h1.id], records[h2.id]
    assert r1 is not None
    assert r2 is not None
    assert r1.kwargs == {"subject": "hi"}
    assert r1.args == ("a@example.com",)
    assert r2.priority == 5
    assert r2.scheduled_at >= r2.created_at + timedelta(milliseconds=9)
    # a registered task is still callable directly: it runs inline
    assert await send_email("x", "y") == "x:y"


async def test_bare_decorator_uses_the_qualname() -> None:
    manager = BackgroundTaskManager()

    @manager.task
    async def plain(x: int) -> int:
        return x + 1

    assert plain.name == plain.fn.__qualname__
    assert plain.__wrapped__ is plain.fn
    async with manager:
        handle = await plain.submit(1)
        assert await handle == 2
        record = await manager.get(handle.id)
        assert record is not None
        assert record.name == plain.fn.__qualname__
        assert await (await manager.submit(plain.fn.__qualname__, 2)) == 3


async def test_unregistered_name_is_the_qualname() -> None:
    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(noop)
        await handle
        record = await manager.get(handle.id)
    assert record is not None
    assert record.name == noop.__qualname__ == "noop"


async def test_unknown_name_lists_the_registered_names() -> None:
    manager = BackgroundTaskManager()
    async with manager:
        with pytest.raises(ValueError, match="none"):
            await manager.submit("ghost")

    @manager.task(name="alpha")
    async def alpha() -> None:
        pass

    @manager.task(name="beta")
    async def beta() -> None:
        pass

    async with manager:
        with pytest.raises(ValueError, match="ghost") as info:
            await manager.submit("ghost")
        assert "alpha" in str(info.value)
        assert "beta" in str(info.value)
        await (await manager.submit("alpha"))


async def test_registered_defaults_queue_and_priority() -> None:
    gate = anyio.Event()
    order: list[str] = []
    manager = BackgroundTaskManager(max_concurrency=1, queues={"mail": 1})

    @manager.task(name="urgent", queue="mail", priority=10)
    async def urgent(tag: str) -> None:
        order.append(tag)

    async def blocker() -> None:
        await gate.wait()

    async def plain(tag: str) -> None:
        order.append(tag)

    async with manager:
        first = await manager.submit(blocker)
        with anyio.fail_after(5):
            while True:
                if manager.statistics().running:
                    break
                await anyio.sleep(0.001)
        p = await manager.submit(plain, "plain")
        u = await urgent.submit("urgent")
        lowered = await urgent.options(priority=-1).submit("lowered")
        rerouted = await urgent.options(queue="default").submit("rerouted")
        gate.set()
        for handle in (first, p, u, lowered, rerouted):
            await handle
        records = [await manager.get(h.id) for h in (u, lowered, rerouted)]
    assert order == ["urgent", "rerouted", "plain", "lowered"]
    assert [(r.queue, r.priority) for r in records if r is not None] == [
        ("mail", 10),
        ("mail", -1),
        ("default", 10),
    ]


async def test_options_key_is_an_idempotency_key() -> None:
    manager = BackgroundTaskManager()

    @manager.task(name="once")
    async def once() -> None:
        await anyio.sleep(0.01)

    async with manager:
        a = await once.options(key="k").submit()
        b = await once.options(key="k").submit()
        assert a == b
        await a


def test_registration_errors() -> None:
    manager = BackgroundTaskManager(queues={"mail": 1})

    @manager.task(name="taken")
    async def first() -> None:
        pass

    async def second() -> None:
        pass

    with pytest.raises(ValueError, match="taken"):
        manager.task(name="taken")(second)
    # registering the same function again under its name is harmless
    assert manager.task(name="taken")(first.fn).fn is first.fn

    def sync() -> None:
        pass

    with pytest.raises(TypeError, match="async"):
        manager.task(sync)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task name"):
        manager.task(name="")(second)
    with pytest.raises(ValueError, match="nowhere"):
        manager.task(name="x", queue="nowhere")
    with pytest.raises(ValueError, match="non-empty"):
        manager.task(name="x", queue="")
    with pytest.raises(ValueError, match="timeout"):
        manager.task(name="x", timeout=-1)
    with pytest.raises(TypeError):
        manager.task(name="x", retry=3)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        manager.task(name="x", priority="high")  # type: ignore[call-overload]
    assert set(manager.registry.tasks) == {"taken"}


async def test_async_callable_object_can_be_registered() -> None:
    class Job:
        async def __call__(self, x: int) -> int:
            return x * 3

    manager = BackgroundTaskManager()
    job = manager.task(name="job")(Job())
    async with manager:
        assert await (await job.submit(2)) == 6
        assert await (await manager.submit(Job(), 3)) == 9


async def test_a_task_of_another_manager_is_refused() -> None:
    one, two = BackgroundTaskManager(), BackgroundTaskManager()

    @one.task(name="mine")
    async def mine() -> None:
        pass

    async with two:
        with pytest.raises(ValueError, match="include"):
            await two.submit(mine)
        await (await two.submit(noop))  # still working


# ------------------------------------------------------------------ TaskRegistry


async def test_standalone_registry_and_include() -> None:
    registry = TaskRegistry()

    @registry.task(name="resize", timeout=5, queue="images")
    async def resize(width: int) -> int:
        return width // 2

    @registry.task
    async def unnamed() -> str:
        return "u"

    with pytest.raises(RuntimeError, match="include"):
        await resize.submit(100)
    assert await resize(10) == 5  # callable inline without a manager

    manager = BackgroundTaskManager(queues={"images": 2})
    manager.include(registry)
    manager.include(registry)  # idempotent
    async with manager:
        handle = await resize.submit(100)
        assert await handle == 50
        record = await manager.get(handle.id)
        assert record is not None
        assert (record.name, record.queue, record.timeout) == ("resize", "images", 5)
        assert await (await manager.submit("resize", 8)) == 4
        assert await (await unnamed.options(priority=1).submit()) == "u"


def test_include_conflicts() -> None:
    registry = TaskRegistry()

    @registry.task(name="dup")
    async def dup() -> None:
        pass

    manager = BackgroundTaskManager()

    @manager.task(name="dup")
    async def other() -> None:
        pass

    with pytest.raises(ValueError, match="dup"):
        manager.include(registry)

    queued = TaskRegistry()

    @queued.task(name="q", queue="nowhere")
    async def q() -> None:
        pass

    with pytest.raises(ValueError, match="nowhere"):
        BackgroundTaskManager(queues={"somewhere": 1}).include(queued)
    BackgroundTaskManager().include(queued)  # without queues= any queue name is fine


# ------------------------------------------------------------------ inheritance


async def test_timeout_inheritance() -> None:
    manager = BackgroundTaskManager(default_timeout=0.03)

    @manager.task(name="patient", timeout=5)
    async def patient(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "woke"

    @manager.task(name="unlimited", timeout=math.inf)
    async def unlimited(seconds: float) -> str:
        await anyio.sleep(seconds)
        return "woke"

    async with manager:
        default = await manager.submit(sleepy, 1)
        task_level = await patient.submit(0.06)
        submit_level = await patient.options(timeout=0.03).submit(1)
        turned_off = await manager.submit(sleepy, 0.06, timeout=math.inf)
        registered_off = await unlimited.submit(0.06)
        longer = await manager.submit(sleepy, 0.06, timeout=5)
        for handle in (default, submit_level):
            with pytest.raises(TaskFailed) as info:
                await handle
            assert isinstance(info.value.__cause__, TaskTimeoutError)
        for handle in (task_level, turned_off, registered_off, longer):
            assert await handle == "woke"
        timeouts = [
            (r.timeout if (r := await manager.get(h.id)) is not None else "missing")
            for h in (default, task_level, submit_level, turned_off, registered_off, longer)
        ]
    assert timeouts == [0.03, 5, 0.03, None, None, 5]


async def test_no_timeout_by_default() -> None:
    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(sleepy, 0.01)
        await handle
        record = await manager.get(handle.id)
    assert record is not None
    assert record.timeout is None


async def test_retry_inheritance() -> None:
    calls: dict[str, int] = {}
    manager = BackgroundTaskManager(
        default_retry=RetryPolicy(max_attempts=3, base_delay=0, jitter=False)
    )

    @manager.task(name="task_level", retry=RetryPolicy(max_attempts=2, base_delay=0))
    async def task_level(tag: str) -> None:
        calls[tag] = calls.get(tag, 0) + 1
        raise ValueError(tag)

    async def unregistered(tag: str) -> None:
        calls[tag] = calls.get(tag, 0) + 1
        raise ValueError(tag)

    async with manager:
        handles = {
            "default": await manager.submit(unregistered, "default"),
            "task": await task_level.submit("task"),
            "submit": await task_level.options(
                retry=RetryPolicy(max_attempts=4, base_delay=0)
            ).submit("submit"),
            "off": await manager.submit(unregistered, "off", retry=RetryPolicy(max_attempts=1)),
        }
        for handle in handles.values():
            with pytest.raises(TaskFailed):
                await handle
        max_attempts = {
            tag: r.max_attempts
            for tag, h in handles.items()
            if (r := await manager.get(h.id)) is not None
        }
    assert calls == {"default": 3, "task": 2, "submit": 4, "off": 1}
    assert max_attempts == {"default": 3, "task": 2, "submit": 4, "off": 1}


async def test_one_attempt_by_default() -> None:
    calls = 0

    async def boom() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("boom")

    async with BackgroundTaskManager() as manager:
        handle = await manager.submit(boom)
        with pytest.raises(TaskFailed):
            await handle
        record = await manager.get(handle.id)
    assert calls == 1
    assert record is not None
    assert record.max_attempts == 1
    assert record.status is TaskStatus.FAILED
