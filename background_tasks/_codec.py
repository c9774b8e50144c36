"""Arguments and results of any type a task annotates, through a journal.

A journal stores JSON. A registered task whose parameters or return value are annotated
with types JSON cannot hold as they are (``datetime``, ``UUID``, ``Decimal``, ``Enum``,
dataclasses, ``TypedDict``s, pydantic models, and containers of them) gets a codec built
from its own type hints with pydantic: values are encoded to JSON-compatible data at
submit (a value its annotation cannot encode is a ``SerializationError`` then, nothing
stored) and decoded back to the annotated types where the task runs or its result is
awaited, in this process or a restarted one. Records keep the JSON-compatible form.

A task without such annotations has no codec at all (``codec_of`` returns None): its
values must be JSON as they are, and it pays nothing. Parameters annotated with a type
JSON holds as it is (``int``, ``str``, ``float``, ``bool``, ``None``, ``list``,
``dict``, ``Any``) are passed through, so an ``int`` argument costs no pydantic call.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, Final

from pydantic import TypeAdapter
from pydantic_core import PydanticSerializationError, ValidationError

from ._errors import SerializationError

__all__ = ["TaskCodec", "codec_of"]

#: Annotations whose values JSON holds as they are: no adapter, no cost.
_PLAIN: Final = frozenset({int, str, float, bool, type(None), None, list, dict, Any, object})


def _adapter(annotation: Any) -> TypeAdapter[Any] | None:
    if annotation in _PLAIN or annotation is inspect.Parameter.empty:
        return None
    try:
        return TypeAdapter(annotation)
    except Exception:  # an annotation pydantic cannot build a schema for: as JSON
        return None


class TaskCodec:
    """Encode and decode one task's arguments and result by its annotations."""

    __slots__ = ("_by_name", "_positional", "_result", "_star", "_starstar", "name")

    def __init__(
        self,
        name: str,
        positional: list[tuple[str, TypeAdapter[Any] | None]],
        by_name: dict[str, TypeAdapter[Any] | None],
        star: TypeAdapter[Any] | None,
        starstar: TypeAdapter[Any] | None,
        result: TypeAdapter[Any] | None,
    ) -> None:
        self.name = name
        self._positional = positional  # parameters that take positional arguments, in order
        self._by_name = by_name  # every named parameter
        self._star = star  # each element of *args
        self._starstar = starstar  # each value of **kwargs
        self._result = result

    def _for_position(self, i: int) -> TypeAdapter[Any] | None:
        return self._positional[i][1] if i < len(self._positional) else self._star

    def _for_name(self, key: str) -> TypeAdapter[Any] | None:
        return self._by_name.get(key, self._starstar)

    def encode_args(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[list[Any], dict[str, Any]]:
        """JSON-compatible arguments; SerializationError names the one that failed."""
        out = [_dump(self._for_position(i), a, self.name, f"argument {i}") for i, a in
               enumerate(args)]  # fmt: skip
        named = {k: _dump(self._for_name(k), v, self.name, repr(k)) for k, v in kwargs.items()}
        return out, named

    def decode_args(
        self, args: list[Any], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The arguments as the task annotates them (for the process that runs it)."""
        out = tuple(_load(self._for_position(i), a) for i, a in enumerate(args))
        return out, {k: _load(self._for_name(k), v) for k, v in kwargs.items()}

    def encode_result(self, value: Any) -> Any:
        return _dump(self._result, value, self.name, "the result")

    def decode_result(self, value: Any) -> Any:
        return _load(self._result, value)


def _dump(adapter: TypeAdapter[Any] | None, value: Any, task: str, what: str) -> Any:
    if adapter is None:
        return value
    try:
        return adapter.dump_python(value, mode="json", warnings="error")
    except (PydanticSerializationError, ValueError, TypeError) as exc:
        raise SerializationError(
            f"{what} of task {task!r} cannot be stored as its annotation says: {exc}"
        ) from exc


def _load(adapter: TypeAdapter[Any] | None, value: Any) -> Any:
    if adapter is None:
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError:  # stored by an older version of the task: as it was stored
        return value


@functools.cache
def _build(fn: Callable[..., Any], name: str) -> TaskCodec | None:
    try:
        hints = typing.get_type_hints(fn)
        signature = inspect.signature(fn)
    except Exception:  # unresolvable hints (a name only known under TYPE_CHECKING): as JSON
        return None
    positional: list[tuple[str, TypeAdapter[Any] | None]] = []
    by_name: dict[str, TypeAdapter[Any] | None] = {}
    star = starstar = None
    kinds = inspect.Parameter
    for p in signature.parameters.values():
        adapter = _adapter(hints.get(p.name, kinds.empty))
        if p.kind is kinds.VAR_POSITIONAL:
            star = adapter
        elif p.kind is kinds.VAR_KEYWORD:
            starstar = adapter
        else:
            by_name[p.name] = adapter
            if p.kind is not kinds.KEYWORD_ONLY:
                positional.append((p.name, adapter))
    result = _adapter(hints.get("return", kinds.empty))
    if result is None and star is None and starstar is None and not any(by_name.values()):
        return None  # nothing to convert: the task pays nothing
    return TaskCodec(name, positional, by_name, star, starstar, result)


def codec_of(fn: Callable[..., Any] | None, name: str) -> TaskCodec | None:
    """The codec of a registered task's function (built once), or None if it needs none."""
    if fn is None:
        return None
    try:
        return _build(fn, name)
    except TypeError:  # an unhashable callable object
        return None
