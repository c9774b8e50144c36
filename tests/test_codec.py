"""Arguments and results of the types a task annotates round-trip through a journal
(SQLite and PostgreSQL, and a restarted process), as JSON-compatible values in records."""

from __future__ import annotations

import dataclasses
import enum
import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypedDict

import psycopg
import pytest
from pydantic import BaseModel

from background_tasks import BackgroundTaskManager, SerializationError, SQLiteJournal
from background_tasks.journal._protocol import Journal
from background_tasks.postgres import PostgresJournal

pytestmark = pytest.mark.anyio

DSN = os.environ.get("BGTASKS_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class Colour(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Options(TypedDict):
    loud: bool


class Invoice(BaseModel):
    number: int
    total: Decimal
    due: datetime


seen: list[dict[str, Any]] = []


def _register(manager: BackgroundTaskManager) -> None:
    @manager.task(name="typed")
    async def typed(
        when: datetime, ident: uuid.UUID, amount: Decimal, colour: Colour, *, point: Point,
        options: Options, invoice: Invoice, count: int, free: Any = None,
    ) -> Invoice:  # fmt: skip
        seen.append(
            {"when": when, "ident": ident, "amount": amount, "colour": colour, "point": point,
             "options": options, "invoice": invoice, "count": count, "free": free}
        )  # fmt: skip
        return invoice.model_copy(update={"number": invoice.number + 1})

    @manager.task(name="plain")
    async def plain(x, y=None):  # type: ignore[no-untyped-def]
        return x


@pytest.fixture(params=["sqlite", "postgres"])
def make_journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Journal]]:
    if request.param == "sqlite":
        yield lambda: SQLiteJournal(tmp_path / "t.db")
        return
    schema = f"codec_{uuid.uuid4().hex[:12]}"
    yield lambda: PostgresJournal(DSN, schema=schema)
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


async def test_annotated_values_come_back_as_their_types_after_a_restart(
    make_journal: Callable[[], Journal],
) -> None:
    when = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    ident = uuid.uuid4()
    invoice = Invoice(number=7, total=Decimal("12.50"), due=when)
    seen.clear()
    first = BackgroundTaskManager(journal=make_journal())
    _register(first)
    async with first:  # delayed: it runs in the next process
        handle = await first.submit(
            "typed", when, ident, Decimal("1.10"), Colour.RED, delay=0.2,
            kwargs={"point": Point(1, 2), "options": {"loud": True}, "invoice": invoice,
                    "count": 3, "free": [1, "a"]},
        )  # fmt: skip
        record = await first.get(handle.id)
    assert record is not None  # records hold the JSON-compatible form
    assert record.args == (when.isoformat().replace("+00:00", "Z"), str(ident), "1.10", "red")
    assert record.kwargs["point"] == {"x": 1, "y": 2}
    assert record.kwargs["invoice"] == {
        "number": 7,
        "total": "12.50",
        "due": "2026-12-01T09:30:00Z",
    }
    second = BackgroundTaskManager(journal=make_journal())
    _register(second)
    async with second:
        result = await second.handle(handle.id)
        done = await second.get(handle.id)
    assert seen == [
        {"when": when, "ident": ident, "amount": Decimal("1.10"), "colour": Colour.RED,
         "point": Point(1, 2), "options": {"loud": True}, "invoice": invoice, "count": 3,
         "free": [1, "a"]}
    ]  # fmt: skip
    assert result == Invoice(number=8, total=Decimal("12.50"), due=when)
    assert done is not None
    assert done.result == {"number": 8, "total": "12.50", "due": "2026-12-01T09:30:00Z"}


async def test_a_value_its_annotation_cannot_encode_is_refused_at_submit(
    make_journal: Callable[[], Journal],
) -> None:
    manager = BackgroundTaskManager(journal=make_journal())
    _register(manager)
    async with manager:
        with pytest.raises(SerializationError, match="argument 1 of task 'typed'"):
            await manager.submit(
                "typed", datetime.now(UTC), "not a uuid", Decimal(1), Colour.RED,
                kwargs={"point": Point(1, 2), "options": {"loud": True}, "count": 1,
                        "invoice": Invoice(number=1, total=Decimal(1), due=datetime.now(UTC))},
            )  # fmt: skip
        with pytest.raises(SerializationError, match="JSON"):  # unannotated: JSON as before
            await manager.submit("plain", datetime.now(UTC) + timedelta(days=1))
        assert await manager.list() == []
        assert await (await manager.submit("plain", {"a": [1]})) == {"a": [1]}
