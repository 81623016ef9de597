"""Other users are kept out, the table's mode is the group's, a full /dev/shm is a clear error.

The attacker is a real second identity: a process forked after import that switches to an unused uid
and gid (ATTACKER) with setresgid/setresuid. Every test also runs with its mechanism switched off
(``_faults.DISABLED``, inherited by the forked processes) and asserts the failure it prevents.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import posix_ipc
import pytest

import mpflight
from mpflight import _codec, _faults, _locks, _table
from tests.conftest import shm_entries
from tests.helpers import DEADLINE, ROOT, mp_context, wait_until, waiting

ATTACKER = 54321  # uid and gid of nobody on this machine
MEMBER = 54322  # uid and gid of a user that is a member of SHARED
SHARED = 54323  # the group a 0o660 table is shared with
BIG = "x" * 100_000  # travels in a result segment


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("tests/test_trust_users.py must run as root in CI: it switches to other users")
        pytest.skip("NOT RUN: the trust tests need root to act as a second user (run the suite as root)")


def _disable(monkeypatch: pytest.MonkeyPatch, mechanism: str) -> None:
    """Switch a mechanism off here and in every process forked from here on."""
    assert mechanism in _faults.MECHANISMS | {""}
    if mechanism:
        monkeypatch.setattr(_faults, "DISABLED", frozenset({mechanism}))


class Child:
    """A process forked from the test, optionally as another user, running fn; its outcome comes back."""

    def __init__(
        self, uid: int | None, fn: Callable[..., Any], *args: Any, groups: tuple[int, ...] = ()
    ) -> None:
        ctx = mp_context("fork")
        self._recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=self._body, args=(uid, groups, send, fn, args), daemon=True)
        self.proc.start()
        send.close()
        self._got: tuple[Any, ...] | None = None

    @staticmethod
    def _body(uid: int | None, groups: tuple[int, ...], send: Any, fn: Callable[..., Any], args: Any) -> None:
        try:
            if uid is not None:
                os.setgroups(list(groups))
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            send.send(("ok", fn(*args)))
        except BaseException as e:  # every outcome goes back to the test
            send.send(("raised", type(e).__name__, str(e)))

    def done(self) -> bool:
        return self._got is not None or self._recv.poll()

    def outcome(self) -> tuple[Any, ...]:
        if self._got is None:
            assert self._recv.poll(DEADLINE), "the child did not finish"
            self._got = self._recv.recv()
            self.proc.join(DEADLINE)
        return self._got

    def value(self) -> Any:
        got = self.outcome()
        assert got[0] == "ok", got
        return got[1]


def _as(uid: int | None, fn: Callable[..., Any], *args: Any, groups: tuple[int, ...] = ()) -> Any:
    return Child(uid, fn, *args, groups=groups).outcome()


# -- a table made by another user -----------------------------------------------------------------------


def _attacker_owns_config(name: str, joined: Any, refused: Any) -> str:
    """A valid table of the attacker's own (0o666), with a call for "config" that returns its value."""
    group = mpflight.Group(name, mode=0o666)

    def poisoned() -> str:
        wait_until(lambda: refused.is_set() or waiting(group, "config") == 1, "root to join or be refused")
        joined.set()
        return "attacker's value"

    return group.do("config", poisoned)


@pytest.mark.parametrize("disabled", ["", "owner-trust"])
def test_a_table_made_by_another_user_is_refused(
    name: str, disabled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attacker pre-creates the name 0o666 with a call in flight for "config": root's Group(name)
    refuses it at once, naming its owner and mode; root's unlink removes it without raising. Without
    the check, root joins the attacker's call and takes the attacker's value."""
    _disable(monkeypatch, disabled)
    ctx = mp_context("fork")
    joined, refused = ctx.Event(), ctx.Event()
    attacker = Child(ATTACKER, _attacker_owns_config, name, joined, refused)
    path = f"/dev/shm/mpf4@{name}"
    wait_until(lambda: os.path.exists(path) and os.stat(path).st_size > 0, "the attacker's table")
    wait_until(lambda: "config" in _keys_in(path), "the attacker's call")
    if disabled:
        with mpflight.Group(name) as group:
            assert group.do("config", lambda: "root's value") == "attacker's value"
    else:
        with pytest.raises(mpflight.MPFlightError) as e:
            mpflight.Group(name)
        message = str(e.value)
        assert f"uid {ATTACKER}" in message and "mode 0o666" in message and path in message
        assert f"mpflight.unlink({name!r})" in message
        refused.set()
    assert attacker.value() == "attacker's value"
    assert mpflight.unlink(name) is True  # root removes it, and nothing raises
    assert shm_entries(name) == []


def _keys_in(path: str) -> str:
    """What a table's bytes say (read as root, without mpflight): enough to see a key arrive."""
    with open(path, "rb") as f:
        return f.read().decode("latin-1")


def _attacker_writes(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    os.fchmod(fd, 0o666)
    os.write(fd, data)
    os.close(fd)


@pytest.mark.parametrize("contents", ["empty", "copy"])
def test_a_squatted_name_is_refused_empty_or_copied(name: str, contents: str) -> None:
    """The attacker squats the name with a 0-byte file, or with a copy of a valid table's bytes: root
    never initialises it, never maps or locks it, and unlink removes it."""
    data = b""
    if contents == "copy":
        other = f"{name}-model"
        with mpflight.Group(other) as model:
            assert model.do("config", lambda: "x") == "x"
        data = Path(f"/dev/shm/mpf4@{other}").read_bytes()
        mpflight.unlink(other)
    path = f"/dev/shm/mpf4@{name}"
    assert _as(ATTACKER, _attacker_writes, path, data) == ("ok", None)
    with pytest.raises(mpflight.AccessDenied, match=f"uid {ATTACKER}"):
        mpflight.Group(name)
    assert os.stat(path).st_size == len(data)
    assert mpflight.unlink(name) is True
    assert shm_entries(name) == []


def _unlink(name: str) -> bool:
    return mpflight.unlink(name)


def test_unlink_by_another_user_does_not_raise(name: str) -> None:
    """unlink as a user that owns none of the objects: nothing raises, nothing is removed."""
    with mpflight.Group(name, slots=1) as group:
        gate = threading.Event()
        owner = threading.Thread(target=group.do, args=("k", lambda: gate.wait(DEADLINE)))
        owner.start()
        wait_until(lambda: waiting(group, "k") == 0, "the owner")
        waiter = threading.Thread(target=group.do, args=("k", int))
        waiter.start()
        wait_until(lambda: waiting(group, "k") == 1, "a waiter, which makes the semaphore")
        before = shm_entries(name)
        assert _as(ATTACKER, _unlink, name) == ("ok", False)
        assert shm_entries(name) == before and len(before) == 2
        gate.set()
        owner.join(DEADLINE)
        waiter.join(DEADLINE)


# -- modes that let a reader hold the lock --------------------------------------------------------------


def _hold_lock_read_only(path: str, locked: Any, release: Any) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    locked.set()
    release.wait(DEADLINE)
    os.close(fd)
    return True


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o664, 0o646])
def test_read_without_write_is_refused(name: str, mode: int) -> None:
    with pytest.raises(ValueError, match="read access alone can hold the table lock"):
        mpflight.Group(name, mode=mode)
    assert shm_entries(name) == []


def test_a_table_whose_mode_lets_readers_lock_is_refused(name: str) -> None:
    """A table chmod-ed (or made by an older mpflight) to 0o644 is refused on attach."""
    mpflight.Group(name).close()
    os.chmod(f"/dev/shm/mpf4@{name}", 0o644)
    with pytest.raises(mpflight.AccessDenied, match="read access alone"):
        mpflight.Group(name)


def test_without_the_mode_check_a_reader_holds_the_lock(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the refusal prevents: on a 0o644 table, another user's read-only descriptor holds the lock,
    and root's calls would block on it for as long as the attacker likes."""
    _disable(monkeypatch, "read-only-modes")
    ctx = mp_context("fork")
    locked, release = ctx.Event(), ctx.Event()
    with mpflight.Group(name, mode=0o644) as group:
        attacker = Child(ATTACKER, _hold_lock_read_only, f"/dev/shm/mpf4@{name}", locked, release)
        assert locked.wait(DEADLINE)
        with pytest.raises(BlockingIOError):
            fcntl.flock(group._table().file.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        release.set()
        assert attacker.value() is True


# -- predictable names pre-created ----------------------------------------------------------------------


def _squat(names: list[str]) -> int:
    made = 0
    for n in names:
        try:
            if n.startswith("sem."):
                posix_ipc.Semaphore("/" + n.removeprefix("sem."), posix_ipc.O_CREX, mode=0o600).close()
            else:
                posix_ipc.SharedMemory("/" + n, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
            made += 1
        except posix_ipc.ExistentialError:
            pass
    return made


def _predictable(name: str, nonce: int, slots: int) -> list[str]:
    """The names of the old scheme (layout 1), and the new ones as they would be without random tokens."""
    names = []
    for slot in range(slots):
        names.append(f"sem.mpf1@{name}@s{slot}")
        names.append(f"sem.{_locks.semaphore_name(name, slot, 1).lstrip('/')}")
        for gen in range(1, 6):
            names.append(f"mpf1@{name}@r{nonce:08x}.{slot}.{gen}")
            names.append(_locks.segment_name(name, nonce, slot, gen).lstrip("/"))
    return names


def _join(name: str, key: str) -> Any:
    with mpflight.Group(name) as group:
        return group.do(key, lambda: "not the owner's")


@pytest.mark.parametrize("disabled", ["", "random-names"])
def test_pre_created_names_change_nothing(name: str, disabled: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user pre-creates every semaphore and segment name it can predict (the old scheme's,
    and the new scheme's as they would be without random tokens): root's calls with waiters and large
    results still work, and unlink removes everything without raising. Without random names, the
    waiter cannot make the slot's semaphore."""
    _disable(monkeypatch, disabled)
    with mpflight.Group(name, slots=2) as group:
        squatted = _predictable(name, group._table().nonce, 2)
        try:
            assert _as(ATTACKER, _squat, squatted) == ("ok", len(squatted))
            for key in ("a", "b", "c"):
                got = _owner_and_remote_waiter(group, name, key)
                if disabled:
                    assert got[0] == "raised" and got[1] == "AccessDenied" and "exist" in got[2], got
                    break
                assert got == ("ok", BIG)
        finally:
            for old in (n for n in squatted if "mpf1@" in n):  # unlink of layout 2 leaves layout 1's
                if old.startswith("sem."):
                    posix_ipc.unlink_semaphore("/" + old.removeprefix("sem."))
                else:
                    posix_ipc.unlink_shared_memory("/" + old)
    assert mpflight.unlink(name) is True
    assert shm_entries(name) == []


def _owner_and_remote_waiter(group: mpflight.Group, name: str, key: str) -> tuple[Any, ...]:
    """This process owns key with a large result; a forked process joins; the waiter's outcome."""
    gate = threading.Event()
    box: list[Any] = []

    def own() -> None:
        box.append(group.do_ex(key, lambda: (gate.wait(DEADLINE), BIG)[1]))

    owner = threading.Thread(target=own)
    owner.start()
    wait_until(lambda: waiting(group, key) == 0, "the owner")
    waiter = Child(None, _join, name, key)
    wait_until(lambda: waiting(group, key) == 1 or waiter.done(), "the waiter")
    gate.set()
    owner.join(DEADLINE)
    got = waiter.outcome()
    assert box == [mpflight.Result(BIG, got[0] == "ok")]
    return got


# -- a segment of another user --------------------------------------------------------------------------


@pytest.mark.parametrize("disabled", ["", "owner-trust"])
def test_a_segment_of_another_user_is_refused(
    name: str, disabled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The segment a slot names belongs to another uid, with that uid's contents: the reader refuses it
    (never the attacker's value). Without the check, the reader returns the attacker's value."""
    _disable(monkeypatch, disabled)
    real = _table.Table.write_segment

    def hijacked(self: _table.Table, index: int, payload: bytes | memoryview) -> None:
        real(self, index, _codec.pack_value("attacker's value".ljust(len(BIG), "!"), None))
        os.chown(f"/dev/shm/{self.segment(index).lstrip('/')}", ATTACKER, ATTACKER)

    monkeypatch.setattr(_table.Table, "write_segment", hijacked)
    with mpflight.Group(name) as group:
        gate = threading.Event()
        owner = threading.Thread(target=group.do, args=("k", lambda: (gate.wait(DEADLINE), BIG)[1]))
        owner.start()
        wait_until(lambda: waiting(group, "k") == 0, "the owner")
        waiter = Child(None, _join, name, "k")
        wait_until(lambda: waiting(group, "k") == 1, "the waiter")
        gate.set()
        owner.join(DEADLINE)
        got = waiter.outcome()
    if disabled:
        assert got == ("ok", "attacker's value".ljust(len(BIG), "!"))
    else:
        assert got[0] == "raised" and got[1] in ("AccessDenied", "AbortError"), got
        assert "refuses the result segment" in got[2] and f"uid {ATTACKER}" in got[2]
        assert "attacker" not in got[2]


# -- the table's mode is the group's --------------------------------------------------------------------


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _member_joins(name: str, key: str) -> Any:
    with mpflight.Group(name) as group:
        return group.mode, group.do(key, lambda: "not the owner's")


def _member_owns(name: str, key: str, release: Any) -> Any:
    seen: list[tuple[int, int, int]] = []
    with mpflight.Group(name) as group:
        real = _table.map_segment

        def record(g: str, seg: str, *args: Any) -> Any:
            seen.append(_stat(_locks.shm_path(seg)))
            return real(g, seg, *args)

        _table.map_segment = record  # type: ignore[assignment]
        value = group.do(key, lambda: (release.wait(DEADLINE), BIG)[1])
    return value, seen


def _member_explicit(name: str, mode: int) -> None:
    mpflight.Group(name, mode=mode)


# The member is the last reader of root's segment and cannot unlink it: /dev/shm is sticky (see
# docs/design.md, "Threat model"); the fixture's unlink, as root, removes it.
@pytest.mark.leaves_segments
@pytest.mark.parametrize("disabled", ["", "table-mode"])
def test_every_process_uses_the_tables_mode_and_group(
    name: str, disabled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A table made 0o660 and given group SHARED; a member of SHARED (another uid, another primary
    group) attaches with the default mode: it adopts 0o660, and the semaphore and segment it makes
    carry 0o660 and SHARED, which root accepts. An explicit other mode is a clear error. Without the
    mechanism, the member makes them with its own 0o600 and its own group."""
    _disable(monkeypatch, disabled)
    mpflight.Group(name, mode=0o660, slots=1).close()
    os.chown(f"/dev/shm/mpf4@{name}", -1, SHARED)
    seen: list[tuple[int, int, int]] = []
    real = _table.map_segment

    def record(g: str, seg: str, *args: Any) -> Any:
        seen.append(_stat(_locks.shm_path(seg)))
        return real(g, seg, *args)

    monkeypatch.setattr(_table, "map_segment", record)
    with mpflight.Group(name) as group:
        assert group.mode == (0o600 if disabled else 0o660)
        with pytest.raises(mpflight.IncompatibleTable, match="has mode 0o660, not 0o600"):
            mpflight.Group(name, mode=0o600)
        for explicit in (0o777, 0o600):
            got = _as(MEMBER, _member_explicit, name, explicit, groups=(SHARED,))
            assert got[1] == "IncompatibleTable" and f"has mode 0o660, not {explicit:#o}" in got[2], got
        # The member is the slot's first waiter: it makes the semaphore.
        gate = threading.Event()
        owner = threading.Thread(target=group.do, args=("k", lambda: (gate.wait(DEADLINE), BIG)[1]))
        owner.start()
        wait_until(lambda: waiting(group, "k") == 0, "root to own k")
        member = Child(MEMBER, _member_joins, name, "k", groups=(SHARED,))
        wait_until(lambda: waiting(group, "k") == 1 or member.done(), "the member to join")
        sem_name = group._table().sems.name(0)
        assert sem_name is not None, member.outcome()
        sem = _stat(_locks.sem_path(sem_name))
        gate.set()
        owner.join(DEADLINE)
        member_got = member.outcome()
        # The member owns a call with a large result; root reads its segment.
        ctx = mp_context("fork")
        release = ctx.Event()
        member = Child(MEMBER, _member_owns, name, "big", release, groups=(SHARED,))
        wait_until(lambda: waiting(group, "big") == 0, "the member to own big")
        box: list[Any] = []

        def root_waits() -> None:
            try:
                box.append(group.do("big", lambda: "not the owner's"))
            except mpflight.MPFlightError as e:
                box.append(e)

        waiter = threading.Thread(target=root_waits)
        waiter.start()
        wait_until(lambda: waiting(group, "big") == 1, "root to join big")
        release.set()
        waiter.join(DEADLINE)
        member.outcome()
    if disabled:
        assert sem == (MEMBER, MEMBER, 0o600)
        assert seen == [(MEMBER, MEMBER, 0o600)]
        assert isinstance(box[0], mpflight.MPFlightError), box  # root refuses what the member made
        return
    assert sem == (MEMBER, SHARED, 0o660)
    assert member_got == ("ok", (0o660, BIG))
    assert seen == [(MEMBER, SHARED, 0o660)]
    assert box == [BIG]


@pytest.mark.leaves_segments  # as above: the member cannot unlink root's segment
def test_root_makes_its_objects_with_the_tables_group(name: str) -> None:
    """Root (primary group 0) owns a large result for a member of SHARED: the segment carries 0o660
    and SHARED, so the member accepts it."""
    mpflight.Group(name, mode=0o660, slots=1).close()
    os.chown(f"/dev/shm/mpf4@{name}", -1, SHARED)
    with mpflight.Group(name) as group:
        gate = threading.Event()
        owner = threading.Thread(target=group.do, args=("k", lambda: (gate.wait(DEADLINE), BIG)[1]))
        owner.start()
        wait_until(lambda: waiting(group, "k") == 0, "root to own k")
        member = Child(MEMBER, _member_joins, name, "k", groups=(SHARED,))
        wait_until(lambda: waiting(group, "k") == 1, "the member to join")
        gate.set()
        owner.join(DEADLINE)
        assert member.value() == (0o660, BIG)


# -- a full /dev/shm ------------------------------------------------------------------------------------

FULL_SCRIPT = textwrap.dedent(
    """
    import errno, json, os, sys, threading
    sys.path.insert(0, sys.argv[1])
    import mpflight
    from tests.helpers import DEADLINE, wait_until, waiting
    out = {}
    with mpflight.Group("full", slots=8) as group:
        fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_WRONLY, 0o600)
        try:  # fill what is left, page by page
            while True:
                os.write(fd, b"x" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        os.close(fd)
        gate = threading.Event()
        owner = threading.Thread(target=group.do, args=("k", lambda: gate.wait(DEADLINE)))
        owner.start()
        wait_until(lambda: waiting(group, "k") == 0, "the owner")
        try:
            group.do("k", int)
            out["joiner"] = ["returned", ""]
        except BaseException as e:
            out["joiner"] = [type(e).__name__, str(e)]
        t = group._table()
        out["records"] = bytes(t.rmap).count(1)
        out["waiters"] = waiting(group, "k")
        gate.set()
        owner.join(DEADLINE)
        try:
            mpflight.Group("full2")
            out["create"] = ["made", ""]
        except BaseException as e:
            out["create"] = [type(e).__name__, str(e)]
        out["left"] = sorted(e for e in os.listdir("/dev/shm") if "full2" in e)
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
@pytest.mark.parametrize("disabled", ["", "space-errors"])
def test_a_full_dev_shm_is_a_clear_error(tmp_path: Path, disabled: str) -> None:
    """In a 1 MiB /dev/shm (a private tmpfs in a mount namespace) filled up: the first waiter of a slot
    cannot make its semaphore and gets NoSpace (an MPFlightError), with no record left; a table that cannot be
    reserved leaves no object. Without the mechanism: a bare OSError, and a 0-byte table left behind."""
    script = tmp_path / "full.py"
    script.write_text(FULL_SCRIPT)
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "{sys.executable}" "{script}" "{ROOT}"'],
        capture_output=True, text=True, timeout=120, check=False, env=dict(os.environ, MPFLIGHT_TEST_DISABLE=disabled),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["records"] == 0 and got["waiters"] == 0, got
    if disabled:
        assert got["joiner"][0] == "OSError", got
        assert got["left"] == ["mpf4@full2"], got
        return
    assert got["joiner"][0] == "NoSpace" and "cannot create semaphore" in got["joiner"][1], got
    assert got["create"][0] == "NoSpace" and "cannot reserve" in got["create"][1], got
    assert got["left"] == [], got


# -- the CLI never initialises a table ------------------------------------------------------------------


def _cli(*args: str, disabled: str = "") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPFLIGHT_TEST_DISABLE=disabled)
    return subprocess.run(
        [sys.executable, "-m", "mpflight", *args], capture_output=True, text=True, env=env, timeout=DEADLINE,
        check=False,
    )  # fmt: skip


@pytest.fixture
def empty_table(name: str) -> str:
    posix_ipc.SharedMemory(f"/mpf4@{name}", posix_ipc.O_CREX, mode=0o600).close_fd()
    return f"/dev/shm/mpf4@{name}"


@pytest.mark.parametrize("disabled", ["", "no-init"])
def test_the_cli_never_initialises_a_table(name: str, empty_table: str, disabled: str) -> None:
    """A 0-byte table (its creator died before sizing it): ls shows it "not initialised", inspect,
    stats and gc say so and exit 1, and the file stays 0 bytes. Without the mechanism, inspect makes
    the table."""
    if disabled:
        assert _cli("inspect", name, disabled=disabled).returncode == 0
        assert os.stat(empty_table).st_size > 0
        return
    ls = _cli("ls")
    assert ls.returncode == 0
    [row] = [line for line in ls.stdout.splitlines() if line.startswith(name)]
    assert "not initialised" in row
    for command in ("inspect", "stats", "gc"):
        proc = _cli(command, name)
        assert proc.returncode == 1 and "not initialised" in proc.stderr, proc
    assert os.stat(empty_table).st_size == 0
    with pytest.raises(mpflight.MPFlightError, match="not initialised"):
        mpflight.Group(name, create=False)
    assert os.stat(empty_table).st_size == 0
    with mpflight.Group(name) as group:  # a process that may create it initialises it
        assert group.do("k", lambda: 1) == 1
