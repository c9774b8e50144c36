"""Durable storage for tasks: the Journal contract and its SQLite implementation.

The PostgreSQL journal lives in ``background_tasks.postgres`` so psycopg stays optional.
"""

from ._protocol import Change as Change
from ._protocol import Journal as Journal
from ._protocol import TaskRow as TaskRow

__all__ = ("Change", "Journal", "TaskRow")
