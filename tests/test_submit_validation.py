"""Every bad input the docs name raises the stated error at the stated moment
(construction, or submit), stores nothing, and leaves the manager working."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from background_tasks import BackgroundTaskManager, RetryPolicy, TaskStatus

# ------------------------------------------------------------------ construction


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_concurrency": 0},
        {"max_concurrency": -1},
        {"max_concurrency": 1.5},
        {"max_concurrency": True},
        {"max_concurrency": "10"},
        {"max_concurrency": None},
        {"queues": {"emails": 0}},
        {"queues": {"emails": -2}},
        {"queues": {"emails": 1.5}},
        {"queues": {"": 1}},
        {"queues": {3: 1}},
        {"queues": [("emails", 2)]},
        {"queues": "emails"},
        {"journal": "tasks.db"},
        {"default_timeout": 0},
        {"default_timeout": -1},
        {"default_timeout": math.nan},
        {"default_timeout": "5"},
        {"max_pending": 0},
        {"max_pending": -1},
        {"max_pending": 2.0},
        {"shutdown_timeout": -1},
        {"shutdown_timeout": math.nan},
        {"shutdown_timeout": "10"},
        {"shutdown_timeout": None},
        {"keep_finished": -1},
        {"keep_finished": 1.5},
        {"max_recoveries": -1},
        {"max_recoveries": None},
    ],
    ids=repr,
)
def test_bad_configuration_raises_value_error_at_construction(kwargs: dict[str, Any]) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match="queue" if name == "queues" else name):
        BackgroundTaskManager(**kwargs)


@pytest.mark.parametrize("retry", [3, "retry", RetryPolicy], ids=repr)
def test_bad_default_retry_raises_value_error(retry: object) -> None:
    with pytest.raises(ValueError, match="default_retry"):
        BackgroundTaskManager(default_retry=retry)  # type: ignore[arg-type]


def test_good_configuration() -> None:
    manager = BackgroundTaskManager(
        max_concurrency=1,
        queues={"emails": 1},
        default_timeout=math.inf,
        default_retry=RetryPolicy(),
        max_pending=1,
        shutdown_timeout=0,
        keep_finished=0,
        max_recoveries=0,
    )
    assert manager.max_concurrency == 1
    assert manager.shutdown_timeout == 0.0
    assert BackgroundTaskManager(queues={}).queues == {}


# ------------------------------------------------------------------ submit


async def good(x: int = 0) -> int:
    return x


def sync_function() -> None:
    pass


async def async_generator() -> Any:  # an async generator is not a coroutine function
    yield 1


class SyncCallable:
    def __call__(self) -> None:
        pass


def _close(value: object) -> object:
    close = getattr(value, "close", None)
    if close is not None:
        close()
    return value


BAD_FUNCTIONS: list[tuple[str, Callable[[], object]]] = [
    ("sync function", lambda: sync_function),
    ("lambda", lambda: lambda: None),
    ("sync callable", SyncCallable),
    ("builtin", lambda: print),
    ("none", lambda: None),
    ("int", lambda: 42),
    ("async generator", lambda: async_generator),
    ("class", lambda: dict),
]

BAD_SUBMITS: list[tuple[str, dict[str, Any], type[Exception]]] = [
    ("kwargs list", {"kwargs": [("x", 1)]}, TypeError),
    ("kwargs keys", {"kwargs": {1: 1}}, TypeError),
    ("unknown queue", {"queue": "nowhere"}, ValueError),
    ("empty queue", {"queue": ""}, ValueError),
    ("priority str", {"priority": "high"}, TypeError),
    ("priority float", {"priority": 1.5}, TypeError),
    ("priority bool", {"priority": True}, TypeError),
    ("priority past 64 bits", {"priority": 2**63}, ValueError),
    ("priority below 64 bits", {"priority": -(2**63) - 1}, ValueError),
    ("negative delay", {"delay": -1}, ValueError),
    ("infinite delay", {"delay": math.inf}, ValueError),
    ("delay str", {"delay": "5"}, TypeError),
    ("zero timeout", {"timeout": 0}, ValueError),
    ("negative timeout", {"timeout": -0.5}, ValueError),
    ("nan timeout", {"timeout": math.nan}, ValueError),
    ("retry int", {"retry": 3}, TypeError),
    ("key int", {"key": 5}, TypeError),
]

WRONG_TYPES: list[tuple[str, dict[str, Any]]] = [
    # a wrong type is a TypeError by Python's convention; a ValueError is tolerated here
    ("queue int", {"queue": 5}),
    ("timeout str", {"timeout": "5"}),
    ("nan delay", {"delay": math.nan}),
    ("negative timedelta", {"delay": -__import__("datetime").timedelta(seconds=1)}),
]


async def _still_works(manager: BackgroundTaskManager) -> None:
    assert manager.statistics().by_status[TaskStatus.PENDING] == 0
    assert await manager.list() == []
    with anyio.fail_after(5):
        assert await (await manager.submit(good, 7)) == 7


pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("label", "make"), BAD_FUNCTIONS, ids=[b[0] for b in BAD_FUNCTIONS])
async def test_not_an_async_function_is_a_type_error_at_submit(
    label: str, make: Callable[[], object]
) -> None:
    async with BackgroundTaskManager() as manager:
        with pytest.raises(TypeError):
            await manager.submit(make())  # type: ignore[call-overload]
        await _still_works(manager)


async def test_a_coroutine_object_is_a_type_error() -> None:
    async with BackgroundTaskManager() as manager:
        coro = good(1)
        try:
            with pytest.raises(TypeError):
                await manager.submit(coro)  # type: ignore[call-overload]
        finally:
            _close(coro)
        await _still_works(manager)


async def test_partial_of_an_async_function_is_accepted() -> None:
    async with BackgroundTaskManager() as manager:
        assert await (await manager.submit(functools.partial(good, 3))) == 3


@pytest.mark.parametrize(("label", "kwargs", "error"), BAD_SUBMITS, ids=[b[0] for b in BAD_SUBMITS])
async def test_bad_submit_argument(
    label: str, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    async with BackgroundTaskManager(queues={"emails": 1}) as manager:
        with pytest.raises(error):
            await manager.submit(good, **kwargs)
        await _still_works(manager)


@pytest.mark.parametrize(("label", "kwargs"), WRONG_TYPES, ids=[b[0] for b in WRONG_TYPES])
async def test_wrong_types_at_submit(label: str, kwargs: dict[str, Any]) -> None:
    async with BackgroundTaskManager(queues={"emails": 1}) as manager:
        with pytest.raises((TypeError, ValueError)):
            await manager.submit(good, **kwargs)
        await _still_works(manager)


async def test_unknown_name_at_submit() -> None:
    async with BackgroundTaskManager() as manager:
        with pytest.raises(ValueError, match="ghost"):
            await manager.submit("ghost")
        await _still_works(manager)


async def test_queue_names_without_queues_config() -> None:
    async with BackgroundTaskManager() as manager:
        # without queues=, any non-empty name is a queue
        assert await (await manager.submit(good, 1, queue="anything")) == 1


async def test_default_queue_is_always_allowed() -> None:
    async with BackgroundTaskManager(queues={"emails": 1}) as manager:
        assert await (await manager.submit(good, 1, queue="default")) == 1
        assert await (await manager.submit(good, 2, queue="emails")) == 2
        with pytest.raises(ValueError, match="emails"):  # the message lists the queues
            await manager.submit(good, queue="other")


async def test_bad_options_on_a_registered_task() -> None:
    manager = BackgroundTaskManager()

    @manager.task(name="t")
    async def t(x: int) -> int:
        return x

    async with manager:
        with pytest.raises(ValueError, match="timeout"):
            await t.options(timeout=-1).submit(1)
        with pytest.raises(TypeError):
            await t.options(priority="x").submit(1)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="delay"):
            await t.options(delay=-5).submit(1)
        assert await (await t.submit(4)) == 4
