"""RetryPolicy as a pure object, tested by tables."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from background_tasks import RetryPolicy, TaskTimeoutError


def test_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3
    assert policy.base_delay == 1.0
    assert policy.multiplier == 2.0
    assert policy.max_delay == 300.0
    assert policy.jitter is True
    assert policy.retry_on == (Exception,)


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 32.0)],
)
def test_base_two_doubles(n: int, expected: float) -> None:
    assert RetryPolicy(base_delay=2.0).delay(n) == expected


@pytest.mark.parametrize(
    ("kwargs", "delays"),
    [
        ({"base_delay": 1.0, "multiplier": 3.0}, [1.0, 3.0, 9.0, 27.0]),
        ({"base_delay": 0.5, "multiplier": 1.0}, [0.5, 0.5, 0.5, 0.5]),
        ({"base_delay": 0.0}, [0.0, 0.0, 0.0, 0.0]),
        ({"base_delay": 2.0, "max_delay": 10.0}, [2.0, 4.0, 8.0, 10.0, 10.0]),
        ({"base_delay": 50.0, "max_delay": 10.0}, [10.0, 10.0]),
        ({"base_delay": 1.0, "max_delay": 0.0}, [0.0, 0.0]),
    ],
)
def test_delay_table(kwargs: dict[str, Any], delays: list[float]) -> None:
    policy = RetryPolicy(**kwargs)
    assert [policy.delay(n) for n in range(1, len(delays) + 1)] == delays


def test_cap_holds_for_huge_retry_numbers() -> None:
    policy = RetryPolicy(base_delay=1.0, multiplier=10.0, max_delay=300.0)
    assert policy.delay(100) == 300.0
    assert policy.delay(10_000) == 300.0  # float overflow is capped, not raised


@pytest.mark.parametrize("n", [0, -1])
def test_delay_of_retry_below_one(n: int) -> None:
    with pytest.raises(ValueError, match="retry number"):
        RetryPolicy().delay(n)


def test_decide_without_jitter_is_exact() -> None:
    policy = RetryPolicy(max_attempts=4, base_delay=2.0, jitter=False)
    error = ValueError("x")
    assert policy.decide(error, 1) == 2.0
    assert policy.decide(error, 2) == 4.0
    assert policy.decide(error, 3) == 8.0
    assert policy.decide(error, 4) is None  # the last attempt failed: no more retries
    assert policy.decide(error, 5) is None


def test_jitter_stays_within_zero_and_delay() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay=2.0, max_delay=20.0, jitter=True)
    for attempt in range(1, 10):
        cap = policy.delay(attempt)
        draws = [policy.decide(ValueError(), attempt) for _ in range(200)]
        assert all(d is not None and 0.0 <= d <= cap for d in draws)
        # "full jitter": the draws spread over the range, not clustered at the delay
        values = [d for d in draws if d is not None]
        assert min(values) < cap / 4
        assert max(values) > cap * 3 / 4


def test_one_attempt_never_retries() -> None:
    policy = RetryPolicy(max_attempts=1)
    assert policy.decide(ValueError(), 1) is None


class Transient(Exception):
    pass


class SubTransient(Transient):
    pass


@pytest.mark.parametrize(
    ("retry_on", "exc", "retried"),
    [
        ((Exception,), ValueError(), True),
        ((Transient,), Transient(), True),
        ((Transient,), SubTransient(), True),
        ((Transient,), ValueError(), False),
        ((KeyError, Transient), KeyError(), True),
        ((TimeoutError,), TaskTimeoutError(), True),  # a TaskTimeoutError is a TimeoutError
        ((ValueError,), TaskTimeoutError(), False),
        ((), ValueError(), False),
    ],
)
def test_retry_on_filters(
    retry_on: tuple[type[BaseException], ...], exc: BaseException, retried: bool
) -> None:
    policy = RetryPolicy(max_attempts=3, jitter=False, retry_on=retry_on)
    assert (policy.decide(exc, 1) is not None) is retried


def test_retry_on_accepts_a_single_class_and_a_list() -> None:
    assert RetryPolicy(retry_on=KeyError).retry_on == (KeyError,)  # type: ignore[arg-type]
    assert RetryPolicy(retry_on=[KeyError, OSError]).retry_on == (  # type: ignore[arg-type]
        KeyError,
        OSError,
    )


def test_frozen_and_hashable() -> None:
    policy = RetryPolicy(max_attempts=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 5  # type: ignore[misc]
    assert policy == RetryPolicy(max_attempts=2)
    assert hash(policy) == hash(RetryPolicy(max_attempts=2))


def test_ints_are_stored_as_floats() -> None:
    policy = RetryPolicy(base_delay=2, multiplier=3, max_delay=10)
    assert isinstance(policy.base_delay, float)
    assert isinstance(policy.multiplier, float)
    assert isinstance(policy.max_delay, float)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": 1.5},
        {"max_attempts": True},
        {"max_attempts": "3"},
        {"base_delay": -0.1},
        {"base_delay": math.nan},
        {"base_delay": math.inf},
        {"base_delay": "1"},
        {"base_delay": True},
        {"multiplier": 0.5},
        {"multiplier": 0},
        {"multiplier": math.inf},
        {"max_delay": -1},
        {"max_delay": math.nan},
        {"jitter": 1},
        {"jitter": "yes"},
        {"retry_on": "ValueError"},
        {"retry_on": (ValueError, "x")},
        {"retry_on": (int,)},
        {"retry_on": ValueError()},
        {"retry_on": None},
    ],
    ids=repr,
)
def test_bad_values_raise_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)
