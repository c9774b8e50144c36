"""The package root re-exports the documented public surface, and only through __all__."""

from __future__ import annotations

import importlib
import inspect

import pytest

import background_tasks

#: Every name the public contract imports from the package root (docs/reference/).
API_NAMES = (
    "BackgroundTaskManager",
    "TaskHandle",
    "TaskRecord",
    "TaskStatus",
    "RetryPolicy",
    "ErrorInfo",
    "SQLiteJournal",
    "current_task",
    "BackgroundTasksError",
    "TaskFailed",
    "TaskCancelled",
    "TaskTimeoutError",
    "TaskNotFound",
    "InvalidTransition",
    "ManagerNotRunning",
    "QueueFull",
    "SerializationError",
    "JournalError",
)


def test_all_is_a_tuple_without_duplicates() -> None:
    assert isinstance(background_tasks.__all__, tuple)
    assert len(set(background_tasks.__all__)) == len(background_tasks.__all__)


@pytest.mark.parametrize("name", background_tasks.__all__)
def test_every_name_in_all_is_importable(name: str) -> None:
    module = importlib.import_module("background_tasks")
    assert hasattr(module, name), f"{name} is in __all__ but not importable"
    value = getattr(module, name)
    # re-exported from a private module, with the public module name where it is a class
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__.startswith("background_tasks")


@pytest.mark.parametrize("name", API_NAMES)
def test_api_names_are_exported(name: str) -> None:
    assert name in background_tasks.__all__
    assert getattr(background_tasks, name) is not None


def test_star_import() -> None:
    namespace: dict[str, object] = {}
    exec("from background_tasks import *", namespace)
    for name in API_NAMES:
        assert name in namespace


def test_no_private_names_in_all() -> None:
    assert not [name for name in background_tasks.__all__ if name.startswith("_")]


def test_public_attributes_are_in_all() -> None:
    public = {
        name
        for name, value in vars(background_tasks).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public <= set(background_tasks.__all__)


def test_error_tree() -> None:
    bt = background_tasks
    leaves = [
        bt.TaskFailed,
        bt.TaskCancelled,
        bt.TaskTimeoutError,
        bt.TaskNotFound,
        bt.InvalidTransition,
        bt.ManagerNotRunning,
        bt.QueueFull,
        bt.SerializationError,
        bt.JournalError,
    ]
    for cls in leaves:
        assert issubclass(cls, bt.BackgroundTasksError)
    assert issubclass(bt.BackgroundTasksError, Exception)
    assert issubclass(bt.TaskTimeoutError, TimeoutError)
    assert issubclass(bt.TaskNotFound, KeyError)
    assert issubclass(bt.SerializationError, TypeError)


@pytest.mark.parametrize(
    "cls",
    [
        "BackgroundTasksError",
        "TaskTimeoutError",
        "InvalidTransition",
        "ManagerNotRunning",
        "QueueFull",
        "SerializationError",
        "JournalError",
        "TaskCancelled",
    ],
)
def test_default_messages_are_the_docstrings(cls: str) -> None:
    error_class = getattr(background_tasks, cls)
    error = error_class()
    assert str(error)
    assert str(error) == (error_class.__doc__ or "").strip()


def test_messages_of_errors_with_arguments() -> None:
    bt = background_tasks
    assert str(bt.TaskNotFound("abc")) == "no task with id 'abc'"
    assert "abc" in str(bt.TaskCancelled("abc"))
    info = bt.ErrorInfo(type="ValueError", message="boom")
    failed = bt.TaskFailed("abc", info)
    assert failed.error is info
    assert failed.task_id == "abc"
    assert "ValueError: boom" in str(failed)
    assert str(bt.QueueFull("custom")) == "custom"


def test_version() -> None:
    assert isinstance(background_tasks.__version__, str)


def test_py_typed_is_shipped() -> None:
    from pathlib import Path

    assert (Path(background_tasks.__file__).parent / "py.typed").is_file()
