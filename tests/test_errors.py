"""Exceptions as outcomes, across real processes: a registered type (``errors=``, ``Codec.register_error``)
reaches every waiter as itself, with its args, attributes and notes; a built-in keeps its standard fields;
mpflight's own errors (WaitTimeout, AbortError, SerializationError) say what happened and what to do.

Every owner is another process (multiprocessing spawn or fork, or an independent interpreter), its fn held
by a gate file until ``inflight()`` shows this process's waiter; then the gate opens.
"""

from __future__ import annotations

import errno
import importlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mpflight
from mpflight import _codec
from mpflight._errors import RemoteTraceback
from tests import workers
from tests.conftest import shm_entries
from tests.helpers import DEADLINE, ROOT, Gate, join_in_thread, mp_context, wait_until

KEY = "user:7"
HOWS = ["spawn", "fork", "subprocess"]


# -- what fn raises or returns in the owner -----------------------------------------------------------


class NotFound(LookupError):
    """A user's error whose ``__init__`` takes other arguments than its args, and keeps attributes."""

    def __init__(self, user_id: int, *, tried: tuple[object, ...] = ()) -> None:
        super().__init__(f"no user {user_id}")
        self.user_id = user_id
        self.tried = tried


class WorkerKilled(BaseException):
    """A cancellation of the user's own (a BaseException, as asyncio.CancelledError is): fn leaves by it,
    and the owner process lives on."""


class Opaque:
    """A type no codec carries."""


def _raise_not_found() -> object:
    exc = NotFound(7, tried=("db", "cache"))
    exc.add_note("looked in 2 places")
    raise exc


def _raise_not_found_at_point() -> object:
    raise NotFound(7, tried=(workers.Point(3, 4),))


def _raise_file_not_found() -> object:
    raise FileNotFoundError(2, "nope", "/x")


def _rename_missing() -> object:
    os.rename("/nonexistent-mpflight/a", "/nonexistent-mpflight/b")
    raise AssertionError("unreachable")


def _raise_cross_device() -> object:
    raise OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")


def _raise_key_error() -> object:
    raise KeyError("x")


def _decode_bad_utf8() -> object:
    return b"ok \xff".decode("utf-8")


def _raise_with_notes() -> object:
    exc = ValueError("v")
    exc.add_note("first note")
    exc.add_note("second note")
    raise exc


def _import_missing() -> object:
    return importlib.import_module("mpflight_no_such_module")


def _raise_timeout() -> object:
    raise TimeoutError("fn's own")


def _raise_system_exit() -> object:
    raise SystemExit(3)


def _raise_worker_killed() -> object:
    raise WorkerKilled("cancelled by the user")


def _raise_long_error() -> object:
    raise ValueError("x" * 4096)


FACTORIES: dict[str, Callable[[], object]] = {
    "value": lambda: "the value",
    "not_found": _raise_not_found,
    "not_found_at_point": _raise_not_found_at_point,
    "file_not_found": _raise_file_not_found,
    "rename": _rename_missing,
    "cross_device": _raise_cross_device,
    "key_error": _raise_key_error,
    "bad_utf8": _decode_bad_utf8,
    "notes": _raise_with_notes,
    "module_not_found": _import_missing,
    "timeout": _raise_timeout,
    "sigkill": workers.FACTORIES["sigkill"],
    "keyboard_interrupt": workers.FACTORIES["keyboard_interrupt"],
    "system_exit": _raise_system_exit,
    "worker_killed": _raise_worker_killed,
    "opaque": Opaque,
    "long_str": lambda: "x" * 4096,
    "long_error": _raise_long_error,
}


def held_factory(gate: str, runs: str, factory: str) -> object:
    """fn: record this execution, hold until the gate opens, then return (or raise) FACTORIES[factory]()."""
    workers.held(gate, runs, None)
    return FACTORIES[factory]()


def not_found_codec() -> mpflight.Codec:
    codec = mpflight.Codec()
    codec.register_error(NotFound)
    return codec


def group_options(register: str, options: dict[str, Any]) -> dict[str, Any]:
    """Group options for a way of registering NotFound (a codec is made in each process, not sent to it)."""
    made: dict[str, dict[str, Any]] = {
        "none": {},
        "errors": {"errors": [NotFound]},
        "codec": {"codec": not_found_codec()},
        "point": {"codec": workers.POINT_CODEC, "errors": [NotFound]},
    }
    return {**made[register], **options}


# -- the owner's process ----------------------------------------------------------------------------------


def own(
    name: str, key: str, gate: str, runs: str, factory: str, out: str, register: str, options: str
) -> None:
    """Own the call for key (fn held by the gate); write what the owner's own caller got, as JSON, to out."""
    workers.arm()
    with mpflight.Group(name, **group_options(register, json.loads(options))) as group:
        outcome: dict[str, object]
        try:
            res = group.do_ex(key, held_factory, gate, runs, factory)
            outcome = {"kind": "value", "type": type(res.value).__qualname__, "shared": res.shared}
        except BaseException as e:
            notes = getattr(e, "__notes__", [])
            outcome = {"kind": "error", "type": type(e).__qualname__, "str": str(e), "notes": notes}
    Path(out).write_text(json.dumps(outcome))


def join_each(name: str, keys: str, out: str) -> None:
    """Join the call of each key in turn, once inflight() shows it running; write each outcome to out."""
    workers.arm()
    got = []
    with mpflight.Group(name) as group:
        for key in json.loads(keys):
            wait_until(lambda key=key: waiters_on(group, key) >= 0, f"the call of {key!r}")
            try:
                res = group.do_ex(key, workers._never)
                got.append({"kind": "value", "value": res.value})
            except Exception as e:
                got.append({"kind": type(e).__name__, "message": str(e)})
    Path(out).write_text(json.dumps(got))


class Owner:
    """A child process that owns the call for key, its fn held until ``gate.open()``."""

    def __init__(
        self, how: str, name: str, key: str, factory: str, tmp: Path, register: str, options: dict[str, Any]
    ) -> None:
        tag = str(len(list(tmp.iterdir())))
        self.gate = Gate(tmp, tag=tag)
        self.out = tmp / f"owner{tag}.json"
        args = (
            name,
            key,
            self.gate.gate,
            self.gate.runs,
            factory,
            str(self.out),
            register,
            json.dumps(options),
        )
        self.proc: Any
        if how == "subprocess":  # an independent interpreter, that imports this module by its package name
            code = "import sys; from tests.test_errors import own; own(*sys.argv[1:])"
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            self.proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=ROOT)
        else:
            self.proc = mp_context(how).Process(target=own, args=args)
            self.proc.start()
        self.pid: int = self.proc.pid
        wait_until(
            lambda: self.gate.executions() == 1 or self.exitcode() is not None, "the owner to start fn"
        )
        assert self.gate.executions() == 1, f"the owner exited with {self.exitcode()} before running fn"

    def exitcode(self) -> int | None:
        return self.proc.poll() if isinstance(self.proc, subprocess.Popen) else self.proc.exitcode

    def reap(self) -> int:
        """Wait for the owner to end (killing it if it outlives the deadline); its exit code."""
        if isinstance(self.proc, subprocess.Popen):
            try:
                return self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        self.proc.join(DEADLINE)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()
            raise AssertionError("the owner outlived the deadline")
        return int(self.proc.exitcode)

    def outcome(self) -> dict[str, Any]:
        """What the owner's own caller got."""
        assert self.reap() == 0
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


@pytest.fixture
def owner(name: str, tmp_path: Path) -> Iterator[Callable[..., Owner]]:
    """Start an owner: owner(how, factory, key=KEY, register="none", **group_options). Reaped at teardown,
    before the name fixture unlinks the table."""
    started: list[Owner] = []

    def start(how: str, factory: str, key: str = KEY, register: str = "none", **options: Any) -> Owner:
        started.append(Owner(how, name, key, factory, tmp_path, register, options))
        return started[-1]

    yield start
    for o in started:
        o.gate.open()
        o.reap()


def waiters_on(group: mpflight.Group, key: str) -> int:
    """How many callers wait on the running call for key (-1: none); a long key matches by its first bytes."""
    for call in group.inflight():
        prefix = not call.key_complete and isinstance(call.key, str) and key.startswith(call.key)
        if call.state == "running" and (call.key == key or prefix):
            return call.waiters
    return -1


def joined(owner: Owner, *groups: mpflight.Group, key: str = KEY) -> list[Any]:
    """Each group joins the owner's call (in a thread each); once all wait, the gate opens. Their outcomes."""
    joiners = [join_in_thread(group, key) for group in groups]
    wait_until(lambda: waiters_on(groups[0], key) == len(groups), "every waiter to join")
    owner.gate.open()
    for thread, _ in joiners:
        thread.join(DEADLINE)
        assert not thread.is_alive(), "a waiter is still waiting"
    return [box[0] for _, box in joiners]


def outcome(owner: Owner, name: str, key: str = KEY, **options: Any) -> Any:
    """This process joins the owner's call, with Group(name, **options); its outcome."""
    with mpflight.Group(name, **options) as group:
        return joined(owner, group, key=key)[0]


def assert_owner_traceback(exc: BaseException, owner: Owner, raiser: Callable[..., object]) -> None:
    """The rebuilt exception's cause is the owner's traceback, which names the function that raised; the last
    note says where it was raised."""
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert raiser.__name__ in str(exc.__cause__)
    assert exc.__notes__[-1].startswith(
        f"raised in the owner process (pid {owner.pid}) of the call for key {KEY!r}:\n"
    )


def hint(type_name: str) -> str:
    return (
        f"{type_name} is not registered to travel between processes: register it in every process, "
        f"with Group(..., errors=[{type_name}]) or Codec.register_error, to get it as itself"
    )


# -- 1. registered user exceptions ------------------------------------------------------------------------


@pytest.mark.parametrize("register", ["errors", "codec"])
@pytest.mark.parametrize("how", HOWS)
def test_a_registered_error_arrives_as_itself(
    name: str, owner: Callable[..., Owner], how: str, register: str
) -> None:
    """NotFound(7, tried=...) raised in the owner: the waiter catches NotFound (whose __init__ takes other
    arguments than its args), with the owner's args, attributes (a tuple stays a tuple), note and traceback."""
    o = owner(how, "not_found", register=register)
    mine = outcome(o, name, **group_options(register, {}))
    assert type(mine) is NotFound
    try:
        raise mine
    except NotFound as caught:
        assert caught is mine
    assert mine.args == ("no user 7",)
    assert str(mine) == "no user 7"
    assert (mine.user_id, mine.tried) == (7, ("db", "cache"))
    assert set(vars(mine)) == {"user_id", "tried", "__notes__"}
    assert mine.__notes__[0] == "looked in 2 places" and len(mine.__notes__) == 2
    assert_owner_traceback(mine, o, _raise_not_found)
    assert o.outcome() == {
        "kind": "error",
        "type": "NotFound",
        "str": "no user 7",
        "notes": ["looked in 2 places"],
    }


def test_the_waiter_s_registration_is_what_counts(name: str, owner: Callable[..., Owner]) -> None:
    """The owner registered nothing: a waiter that registered NotFound still gets it as itself (the
    owner always sends an exception's args and attributes; the reader decides what it rebuilds)."""
    o = owner("spawn", "not_found")
    mine = outcome(o, name, errors=[NotFound])
    assert type(mine) is NotFound and (mine.user_id, mine.tried) == (7, ("db", "cache"))


@pytest.mark.parametrize(
    "register", ["none", "errors"], ids=["nobody registered", "only the owner registered"]
)
def test_an_unregistered_error_is_a_remote_error_that_says_how_to_register(
    name: str, owner: Callable[..., Owner], register: str
) -> None:
    o = owner("spawn", "not_found", register=register)
    mine = outcome(o, name)
    assert type(mine) is mpflight.RemoteError
    assert not isinstance(mine, NotFound)
    assert mine.type_name == "tests.test_errors.NotFound"
    assert mine.message == "no user 7"
    assert str(mine) == "tests.test_errors.NotFound: no user 7"
    assert hint("tests.test_errors.NotFound") in mine.__notes__
    assert hint("tests.test_errors.NotFound") in "".join(traceback.format_exception(mine))
    assert "_raise_not_found" in mine.traceback
    assert_owner_traceback(mine, o, _raise_not_found)


def test_errors_with_a_codec_use_a_copy_of_it(name: str, owner: Callable[..., Owner]) -> None:
    """Group(codec=c, errors=[NotFound]) carries what c carries (a Point attribute) and NotFound; c itself
    is not changed: a Group with c alone, waiting on the same call, gets RemoteError."""
    o = owner("spawn", "not_found_at_point", register="point")
    codec = mpflight.Codec()
    codec.register(workers.Point, 1, workers._point_to_wire, workers._point_from_wire)
    with (
        mpflight.Group(name, codec=codec, errors=[NotFound]) as copied,
        mpflight.Group(name, codec=codec) as plain,
    ):
        assert copied.codec is not codec and plain.codec is codec
        mine_copied, mine_plain = joined(o, copied, plain)
    assert type(mine_copied) is NotFound
    assert mine_copied.tried == (workers.Point(3, 4),)
    assert type(mine_plain) is mpflight.RemoteError
    assert mine_plain.type_name == "tests.test_errors.NotFound"
    assert o.outcome()["type"] == "NotFound"


# -- 2. built-in exceptions keep their standard attributes ---------------------------------------------

BUILTINS: dict[str, tuple[str, Callable[[], object], type[BaseException], dict[str, object], str]] = {
    # id: (how, fn, type, attributes, str)
    "FileNotFoundError": (
        "spawn", _raise_file_not_found, FileNotFoundError,
        {"args": (2, "nope"), "errno": 2, "strerror": "nope", "filename": "/x", "filename2": None},
        "[Errno 2] nope: '/x'",
    ),
    "os.rename's FileNotFoundError": (
        "fork", _rename_missing, FileNotFoundError,
        {"errno": errno.ENOENT, "strerror": os.strerror(errno.ENOENT),
         "filename": "/nonexistent-mpflight/a", "filename2": "/nonexistent-mpflight/b"},
        f"[Errno 2] {os.strerror(errno.ENOENT)}: '/nonexistent-mpflight/a' -> '/nonexistent-mpflight/b'",
    ),
    "OSError with filename2": (
        "subprocess", _raise_cross_device, OSError,
        {"errno": errno.EXDEV, "strerror": "Invalid cross-device link", "filename": "/a", "filename2": "/b"},
        f"[Errno {errno.EXDEV}] Invalid cross-device link: '/a' -> '/b'",
    ),
    "KeyError": ("spawn", _raise_key_error, KeyError, {"args": ("x",)}, "'x'"),
    "UnicodeDecodeError": (
        "fork", _decode_bad_utf8, UnicodeDecodeError,
        {"encoding": "utf-8", "object": b"ok \xff", "start": 3, "end": 4, "reason": "invalid start byte"},
        "'utf-8' codec can't decode byte 0xff in position 3: invalid start byte",
    ),
    "ModuleNotFoundError": (
        "spawn", _import_missing, ModuleNotFoundError, {"name": "mpflight_no_such_module", "path": None},
        "No module named 'mpflight_no_such_module'",
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    ("how", "raiser", "type_", "attributes", "text"), BUILTINS.values(), ids=BUILTINS.keys()
)
def test_builtin_errors_keep_their_fields(
    name: str,
    owner: Callable[..., Owner],
    how: str,
    raiser: Callable[[], object],
    type_: type[BaseException],
    attributes: dict[str, object],
    text: str,
) -> None:
    factory = next(k for k, v in FACTORIES.items() if v is raiser)
    o = owner(how, factory)
    mine = outcome(o, name)
    assert type(mine) is type_
    assert {a: getattr(mine, a) for a in attributes} == attributes
    assert str(mine) == text
    assert_owner_traceback(mine, o, raiser)
    assert o.outcome()["str"] == text


def test_notes_travel_before_the_owner_s_note(name: str, owner: Callable[..., Owner]) -> None:
    o = owner("spawn", "notes")
    mine = outcome(o, name)
    assert type(mine) is ValueError and mine.args == ("v",)
    assert mine.__notes__[:2] == ["first note", "second note"] and len(mine.__notes__) == 3
    assert_owner_traceback(mine, o, _raise_with_notes)
    assert o.outcome()["notes"] == ["first note", "second note"]  # the owner's own exception is unchanged


def test_registering_a_builtin_type_loses_nothing(name: str, owner: Callable[..., Owner]) -> None:
    """errors=[UnicodeDecodeError] (a user listing every type fn raises): the waiter gets the error whole,
    as without the registration; or Group refuses the registration, naming the type."""
    try:
        group = mpflight.Group(name, errors=[UnicodeDecodeError])
    except (TypeError, ValueError) as e:
        assert "UnicodeDecodeError" in str(e)
        return
    o = owner("spawn", "bad_utf8")
    with group:
        mine = joined(o, group)[0]
    assert type(mine) is UnicodeDecodeError
    expected = {
        "encoding": "utf-8",
        "object": b"ok \xff",
        "start": 3,
        "end": 4,
        "reason": "invalid start byte",
    }
    assert {a: getattr(mine, a) for a in expected} == expected
    assert str(mine) == "'utf-8' codec can't decode byte 0xff in position 3: invalid start byte"


# -- 3. fn's TimeoutError is not mpflight's WaitTimeout --------------------------------------------------


def test_fn_s_own_timeout_error_is_not_a_wait_timeout(name: str, owner: Callable[..., Owner]) -> None:
    o = owner("spawn", "timeout")
    mine = outcome(o, name, timeout=DEADLINE)
    assert type(mine) is TimeoutError
    assert not isinstance(mine, mpflight.WaitTimeout | mpflight.MPFlightError)
    assert mine.args == ("fn's own",)
    assert_owner_traceback(mine, o, _raise_timeout)


def test_a_waiter_that_runs_out_of_time_gets_wait_timeout(name: str, owner: Callable[..., Owner]) -> None:
    """The owner is held for as long as the test likes; the waiter's timeout=0.5 ends its wait."""
    o = owner("spawn", "value")
    with mpflight.Group(name, timeout=0.5) as group:
        thread, box = join_in_thread(group, KEY)
        thread.join(DEADLINE)
        assert not thread.is_alive()
    o.gate.open()
    (mine,) = box
    assert type(mine) is mpflight.WaitTimeout
    assert isinstance(mine, TimeoutError) and isinstance(mine, mpflight.MPFlightError)
    assert (mine.key, mine.timeout) == (KEY, 0.5)
    assert str(mine) == f"gave up waiting 0.5 s for the call of key {KEY!r}"
    again = pickle.loads(pickle.dumps(mine))
    assert type(again) is mpflight.WaitTimeout
    assert (again.key, again.timeout, str(again)) == (KEY, 0.5, str(mine))
    assert o.outcome()["kind"] == "value", "the owner's caller gets its value"


# -- 4. AbortError: did the owner die, or leave fn? -------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "factory", "died"),
    [
        ("spawn", "sigkill", True),
        ("fork", "sigkill", True),
        ("subprocess", "sigkill", True),
        ("spawn", "keyboard_interrupt", False),
        ("fork", "system_exit", False),
        ("subprocess", "keyboard_interrupt", False),
        ("spawn", "worker_killed", False),
    ],
)
def test_abort_says_whether_the_owner_died(
    name: str, owner: Callable[..., Owner], how: str, factory: str, died: bool
) -> None:
    o = owner(how, factory)
    mine = outcome(o, name)
    assert type(mine) is mpflight.AbortError
    assert (mine.key, mine.owner_pid, mine.takeovers) == (KEY, o.pid, 0)
    assert mine.owner_died is died, mine.reason
    assert "retry, or on_abort='retry'" in str(mine)
    again = pickle.loads(pickle.dumps(mine))
    assert type(again) is mpflight.AbortError
    assert (again.key, again.owner_pid, again.reason, again.takeovers, again.owner_died, str(again)) == (
        mine.key, mine.owner_pid, mine.reason, mine.takeovers, mine.owner_died, str(mine),
    )  # fmt: skip
    if died:
        assert o.reap() == -signal.SIGKILL
    else:
        left = {
            "keyboard_interrupt": "KeyboardInterrupt",
            "system_exit": "SystemExit",
            "worker_killed": "WorkerKilled",
        }
        assert mine.reason == f"the owner left fn with {left[factory]}"
        assert o.outcome()["type"] == left[factory], "the owner's caller gets its exception unchanged"


def test_abort_of_a_10_kib_key_has_a_short_message_and_the_whole_key(
    name: str, owner: Callable[..., Owner]
) -> None:
    key = "user:" + "x" * 10 * 1024
    o = owner("spawn", "sigkill", key=key)
    mine = outcome(o, name, key=key)
    assert type(mine) is mpflight.AbortError and mine.owner_died
    assert mine.key == key
    assert len(str(mine)) < 300
    assert str(mine).startswith("call for key 'user:xxx") and "xxx...xxx" in str(mine)
    assert pickle.loads(pickle.dumps(mine)).key == key


def test_abort_error_after_takeovers_pickles_and_says_so() -> None:
    exc = mpflight.AbortError(b"k", 12, "owner died", takeovers=2)
    again = pickle.loads(pickle.dumps(exc))
    assert (again.key, again.owner_pid, again.reason, again.takeovers) == (b"k", 12, "owner died", 2)
    assert again.owner_died
    message = "call for key b'k' aborted: owner died (owner pid 12); 2 takeover(s) spent; retry"
    assert str(again) == str(exc) == message


# -- 5. outcomes that cannot travel ----------------------------------------------------------------------


def test_a_value_no_codec_carries_names_key_type_and_remedy(name: str, owner: Callable[..., Owner]) -> None:
    o = owner("spawn", "opaque")
    mine = outcome(o, name)
    assert type(mine) is mpflight.SerializationError
    message = str(mine)
    assert f"key {KEY!r}" in message
    assert "'tests.test_errors.Opaque'" in message
    assert "register a codec" in message and "mpflight.Codec.register" in message
    assert o.outcome() == {"kind": "value", "type": "Opaque", "shared": True}, "the owner keeps its value"


@pytest.mark.parametrize(("factory", "kind"), [("long_str", "str"), ("long_error", "ValueError")])
def test_an_outcome_over_max_result_bytes_names_key_and_remedy(
    name: str, owner: Callable[..., Owner], factory: str, kind: str
) -> None:
    o = owner("fork", factory, max_result_bytes=1024)
    mine = outcome(o, name, max_result_bytes=1024)
    assert type(mine) is mpflight.SerializationError
    message = str(mine)
    assert message.startswith(f"the outcome of key {KEY!r} ({kind}, ")
    assert "exceeds max_result_bytes (1024); raise max_result_bytes" in message


def test_the_owner_logs_each_kind_of_uncarried_outcome_once(
    name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """This process owns four calls, each joined by one child: two values of a type no codec carries and
    two outcomes over max_result_bytes. The child gets four SerializationErrors; the log has two warnings."""
    keys = ["a", "b", "c", "d"]
    out = tmp_path / "joined.json"
    child = mp_context("spawn").Process(target=join_each, args=(name, json.dumps(keys), str(out)))
    values: list[object] = []
    with (
        caplog.at_level(logging.WARNING, logger="mpflight"),
        mpflight.Group(name) as group,
        mpflight.Group(name, max_result_bytes=1024) as small,
    ):
        calls = [(group, Opaque()), (group, Opaque()), (small, "x" * 4096), (small, "y" * 4096)]
        child.start()
        try:
            for key, (handle, value) in zip(keys, calls, strict=True):
                gate = Gate(tmp_path, tag=key)
                args = (key, workers.held, gate.gate, gate.runs, value)
                thread = threading.Thread(target=lambda h=handle, a=args: values.append(h.do(*a)))
                thread.start()
                wait_until(lambda h=handle, k=key: waiters_on(h, k) == 1, f"the child to join {key!r}")
                gate.open()
                thread.join(DEADLINE)
                assert not thread.is_alive()
        finally:
            child.join(DEADLINE)
            if child.exitcode is None:
                child.kill()
                child.join()
    assert child.exitcode == 0
    assert len(values) == 4 and values[2:] == ["x" * 4096, "y" * 4096], "the owner keeps its values"
    got = json.loads(out.read_text())
    assert [g["kind"] for g in got] == ["SerializationError"] * 4
    assert [f"key {k!r}" in g["message"] for k, g in zip(keys, got, strict=True)] == [True] * 4
    warned = [r for r in caplog.records if r.name == "mpflight" and "SerializationError" in r.getMessage()]
    assert [r.levelno for r in warned] == [logging.WARNING] * 2, [r.getMessage() for r in warned]
    first, second = (r.getMessage() for r in warned)
    assert repr(name) in first and "key 'a'" in first and "register a codec" in first
    assert repr(name) in second and "key 'c'" in second and "raise max_result_bytes" in second


# -- 6. what errors= refuses -------------------------------------------------------------------------------


def _local_error() -> type[Exception]:
    class LocalError(Exception):
        pass

    return LocalError


# Another class named tests.test_errors.NotFound.
Impostor = type("NotFound", (Exception,), {"__module__": __name__})

BAD_ERRORS: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    "a type, not a list": (lambda: NotFound, TypeError, "errors must be a list of exception types"),
    "None": (lambda: None, TypeError, "errors must be a list of exception types"),
    "an int": (lambda: 5, TypeError, "errors must be a list of exception types"),
    "a str": (lambda: "NotFound", TypeError, "'NotFound'"),
    "a name in a list": (lambda: ["NotFound"], TypeError, "Exception subclasses, not 'NotFound'"),
    "not an exception type": (lambda: [NotFound, int], TypeError, "Exception subclasses, not <class 'int'>"),
    "a BaseException only": (lambda: [KeyboardInterrupt], TypeError, "Exception subclasses, not <class 'KeyboardInterrupt'>"),
    "an instance": (lambda: [NotFound(1)], TypeError, "Exception subclasses"),
    "a class defined in a function": (lambda: [_local_error()], ValueError, "defined inside a function"),
    "two classes of one name": (lambda: [NotFound, Impostor], ValueError, "another exception type named 'tests.test_errors.NotFound'"),
}  # fmt: skip


@pytest.mark.parametrize(("bad", "error", "match"), BAD_ERRORS.values(), ids=BAD_ERRORS.keys())
def test_bad_errors_are_refused_clearly_and_create_nothing(
    name: str, bad: Callable[[], object], error: type[Exception], match: str
) -> None:
    codec = mpflight.Codec()
    with pytest.raises(error) as raised:
        mpflight.Group(name, codec=codec, errors=bad())  # type: ignore[arg-type]
    assert match in str(raised.value)
    assert shm_entries(name) == []
    assert type(_roundtrip(NotFound(1), codec)) is mpflight.RemoteError  # the caller's codec is unchanged


def test_codec_register_error_refuses_what_errors_refuses() -> None:
    codec = mpflight.Codec()
    for bad in (int, KeyboardInterrupt, "NotFound", NotFound(1)):
        with pytest.raises(TypeError, match="Exception subclasses"):
            codec.register_error(bad)  # type: ignore[arg-type]
    codec.register_error(NotFound)
    codec.register_error(NotFound)  # the same type again changes nothing
    with pytest.raises(ValueError, match="registered already"):
        codec.register_error(Impostor)
    assert type(_roundtrip(NotFound(1), codec)) is NotFound


@pytest.mark.parametrize("make", [tuple, set, iter, list], ids=["tuple", "set", "iterator", "list"])
def test_any_iterable_of_types_is_accepted(name: str, make: Callable[[list[type]], object]) -> None:
    with mpflight.Group(name, errors=make([NotFound])) as group:  # type: ignore[arg-type]
        assert type(_roundtrip(NotFound(1), group.codec)) is NotFound


def _roundtrip(exc: Exception, codec: mpflight.Codec | None) -> BaseException:
    try:
        raise exc
    except Exception as e:
        payload = _codec.pack_error(e, codec)
    with pytest.raises(Exception) as raised:
        _codec.unpack(payload, codec, key=KEY, owner_pid=1)
    return raised.value
