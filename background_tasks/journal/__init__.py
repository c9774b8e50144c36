"""Durable storage for tasks: the Journal contract, its optional capabilities, and the
SQLite journal (``background_tasks.journal.sqlite``).

The PostgreSQL journal lives in ``background_tasks.postgres`` so psycopg stays optional.
"""

from ._protocol import BatchingJournal as BatchingJournal
from ._protocol import Change as Change
from ._protocol import ClaimingJournal as ClaimingJournal
from ._protocol import InspectableJournal as InspectableJournal
from ._protocol import Journal as Journal
from ._protocol import NotifyingJournal as NotifyingJournal
from ._protocol import TaskRow as TaskRow

__all__ = (
    "BatchingJournal",
    "Change",
    "ClaimingJournal",
    "InspectableJournal",
    "Journal",
    "NotifyingJournal",
    "TaskRow",
)
