"""The public surface is Go-sized and documented; errors keep their data across pickling."""

from __future__ import annotations

import pickle

import pytest

import mpflight


def test_public_names() -> None:
    assert sorted(mpflight.__all__) == [
        "AbortError",
        "AccessDenied",
        "Codec",
        "CorruptPayload",
        "CorruptSlot",
        "DamagedTable",
        "DeadlockError",
        "Group",
        "IncompatibleTable",
        "InflightCall",
        "MPFlightError",
        "NoSpace",
        "NoSuchTable",
        "NotInitialised",
        "RemoteError",
        "Result",
        "SerializationError",
        "TierUnavailable",
        "WaitTimeout",
        "coalesce",
        "fence",
        "tables",
        "unlink",
    ]
    for name in mpflight.__all__:
        assert getattr(mpflight, name).__module__.startswith("mpflight")


@pytest.mark.parametrize(
    "error",
    [
        mpflight.AbortError("k", 12, "owner died"),
        mpflight.SerializationError("cannot carry a value of type 'object'"),
        mpflight.RemoteError("pkg.Error", "message", "Traceback ..."),
        mpflight.DeadlockError(["a", b"b"]),
        mpflight.NoSuchTable("name"),
        mpflight.IncompatibleTable("name", "has an incompatible layout"),
        mpflight.DamagedTable("name", "is damaged"),
        mpflight.CorruptSlot("name", 3, "outcome location 9"),
        mpflight.AccessDenied("/dev/shm/x", "permission denied"),
        mpflight.NoSpace("/dev/shm/x", "no room"),
        mpflight.NotInitialised("name"),
        mpflight.CorruptPayload("a truncated map"),
        mpflight.TierUnavailable("name", "ConnectionError: refused"),
    ],
)
def test_errors_pickle_with_their_data(error: mpflight.MPFlightError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
    assert isinstance(copy, mpflight.MPFlightError)


def test_long_keys_are_shortened_in_messages() -> None:
    assert len(str(mpflight.AbortError("k" * 10_000, 1))) < 200


def test_result_unpacks_like_go() -> None:
    value, shared = mpflight.Result(1, True)
    assert (value, shared) == (1, True)
    assert mpflight.Result(1, False)._fields == ("value", "shared")


def test_deadlock_error_is_a_runtime_error() -> None:
    assert issubclass(mpflight.DeadlockError, RuntimeError)
