"""Durable storage for tasks: the Journal contract and its optional capabilities
(``_protocol``), and the two journals that implement it.

``background_tasks.journal.sqlite``: ``SQLiteJournal``, one file shared by the processes
of one machine. ``background_tasks.journal.postgres``: ``PostgresJournal``, one database
shared by many machines; it needs psycopg (``pip install 'anyio-background-tasks[postgres]'``),
so nothing here imports it, and ``background_tasks.postgres`` re-exports it.
``_group_commit`` is the batching both journals share.
"""

from ._protocol import BatchingJournal as BatchingJournal
from ._protocol import Change as Change
from ._protocol import ClaimingJournal as ClaimingJournal
from ._protocol import ClaimLimits as ClaimLimits
from ._protocol import ClockedJournal as ClockedJournal
from ._protocol import InspectableJournal as InspectableJournal
from ._protocol import Journal as Journal
from ._protocol import LivenessJournal as LivenessJournal
from ._protocol import NotifyingJournal as NotifyingJournal
from ._protocol import PeriodicJournal as PeriodicJournal
from ._protocol import PeriodicRow as PeriodicRow
from ._protocol import TaskRow as TaskRow

__all__ = (
    "BatchingJournal",
    "Change",
    "ClaimLimits",
    "ClaimingJournal",
    "ClockedJournal",
    "InspectableJournal",
    "Journal",
    "LivenessJournal",
    "NotifyingJournal",
    "PeriodicJournal",
    "PeriodicRow",
    "TaskRow",
)
