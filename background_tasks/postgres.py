"""``from background_tasks.postgres import PostgresJournal``: the PostgreSQL journal, which
lives in ``background_tasks.journal.postgres``.

It needs psycopg 3, which the package does not require: ``pip install
'anyio-background-tasks[postgres]'``. Without it, importing this module raises ImportError
saying so.
"""

from .journal.postgres import CHANNEL as CHANNEL
from .journal.postgres import SCHEMA_VERSION as SCHEMA_VERSION
from .journal.postgres import PostgresJournal as PostgresJournal

__all__ = ("CHANNEL", "SCHEMA_VERSION", "PostgresJournal")
