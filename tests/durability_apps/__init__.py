"""Helpers for tests/test_durability*.py: the tasks every process registers (``tasks``)
and a worker process the tests start, stop, SIGSTOP and SIGKILL (``worker``)."""
