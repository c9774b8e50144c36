"""The distribution's name and its optional dependencies (extras).

A module that needs an extra imports it inside ``try`` and raises ``missing_extra(...)``
from the ``ImportError``, so that the message says what to install:

```python
try:
    import psycopg
except ImportError as exc:
    raise missing_extra("background_tasks.postgres", "postgres", exc) from exc
```
"""

from __future__ import annotations

from typing import Final

__all__ = ["DISTRIBUTION", "MissingExtra", "missing_extra"]

#: The name to ``pip install`` (``background-tasks`` on PyPI is an unrelated project).
DISTRIBUTION: Final = "anyio-background-tasks"


class MissingExtra(ModuleNotFoundError):
    """A module of this package needs an optional dependency that is not installed."""


def missing_extra(module: str, extra: str, exc: ImportError) -> MissingExtra:
    """The error for ``module`` when ``exc`` says a dependency of the ``extra`` is missing."""
    needed = exc.name.partition(".")[0] if exc.name else "an optional dependency"
    return MissingExtra(
        f"{module} needs {needed}, which the {extra!r} extra installs: "
        f"pip install '{DISTRIBUTION}[{extra}]'",
        name=exc.name,
    )
