"""Every OS object of a table: names, the table lock, per-slot semaphores, result segments.

The only module that touches posix_ipc (whose stub is loose: nothing of it leaks out typed as Any).

The table lock is ``flock`` on the table's own file descriptor, behind a ``threading.Lock`` for the
threads of one process. The kernel drops an flock when its holder dies, at any instruction; a POSIX
semaphore used as a lock cannot tell a holder that died right after ``sem_wait`` returned from one
that is merely slow (docs/design.md, "The table lock"). flock belongs to an open file description,
which a forked child shares with its parent, so a child reopens the table through /proc/self/fd to get
one of its own (``TableLock.after_fork_in_child``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import hashlib
import mmap
import os
import pwd
import re
import secrets
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Final

import posix_ipc

from . import _faults
from ._errors import (
    AccessDenied,
    DamagedTable,
    IncompatibleTable,
    MPFlightError,
    NoSpace,
    NoSuchTable,
    NotInitialised,
    SegmentFull,
    start_thread,
)
from ._layout import HEADER_SIZE, LAYOUT_VERSION

# Every object name starts with this, then the layout version: `ls /dev/shm | grep mpf` finds them all.
PREFIX: Final = f"/mpf{LAYOUT_VERSION}@"
# Separates the group's name from an object's suffix; never part of a group name ([A-Za-z0-9._-]).
SEP: Final = "@"
# macOS caps semaphore and shm names at 31 bytes (PSEMNAMLEN, PSHMNAMLEN); Linux at NAME_MAX (255)
# less the "sem." that glibc puts in front of a semaphore's file name.
NAME_LIMIT: Final = 31 if sys.platform == "darwin" else 250
SHM_DIR: Final = "/dev/shm"


def object_name(group: str, suffix: str = "") -> str:
    """The OS name of one of ``group``'s objects: the table (no suffix), a semaphore or a segment.

    The group's name is kept readable where the platform allows; where it would not fit, it is
    replaced by a digest (the table's header keeps the real name).
    """
    name = f"{PREFIX}{group}{suffix}"
    if len(name) > NAME_LIMIT:
        digest = hashlib.blake2b(group.encode(), digest_size=5).hexdigest()
        name = f"{PREFIX}{digest}{suffix}"
    return name


# How many fresh random names an object creation tries before giving up: a collision of two random
# u64 is as good as impossible, so a second try already means something else squats the names.
NAME_TRIES: Final = 8


def new_token(predictable: int) -> int:
    """A random nonzero u64 for an object's name, which nobody can guess and so pre-create.

    ``predictable`` is what a name would use without it (test-only switch ``random-names``)."""
    if "random-names" in _faults.DISABLED:
        return predictable
    return secrets.randbits(64) or 1


def semaphore_name(group: str, slot: int, token: int) -> str:
    """A slot's wake-up semaphore: the token is random and recorded in the slot (S_SEM_TOKEN)."""
    return object_name(group, f"{SEP}s{slot}.{token & 0xFFFFFFFFFFFFFFFF:016x}")


def segment_name(group: str, nonce: int, slot: int, token: int) -> str:
    """A result segment's name: the token is random, recorded in the slot (S_SEGMENT_TOKEN); the
    table's nonce keeps apart the segments of a table made anew under the same name while calls of
    the old one still finish, and lets gc find this table's orphans by prefix."""
    return object_name(group, f"{SEP}r{nonce:08x}.{slot}.{token & 0xFFFFFFFFFFFFFFFF:016x}")


def shm_path(os_name: str) -> str:
    return f"{SHM_DIR}/{os_name.lstrip('/')}"


def sem_path(os_name: str) -> str:
    return f"{SHM_DIR}/sem.{os_name.lstrip('/')}"


def _whose(st: os.stat_result) -> str:
    try:
        user = f"user {pwd.getpwuid(st.st_uid).pw_name} (uid {st.st_uid})"
    except KeyError:
        user = f"uid {st.st_uid}"
    try:
        group = f"group {grp.getgrgid(st.st_gid).gr_name} (gid {st.st_gid})"
    except KeyError:
        group = f"gid {st.st_gid}"
    return f"{user}, {group}, mode {stat.S_IMODE(st.st_mode):#o}"


def check_mode(mode: int) -> str | None:
    """Why ``mode`` cannot be a table's mode, or None. flock works on a read-only descriptor, so read
    access alone would let a reader hold the table lock: group and other get read and write, or nothing."""
    if mode & 0o600 != 0o600:
        return f"mode {mode:#o} must give the owner read and write"
    for who, shift in (("group", 3), ("other", 0)):
        if (mode >> shift) & 0o6 not in (0, 0o6) and "read-only-modes" not in _faults.DISABLED:
            return (
                f"mode {mode:#o} gives {who} only part of read+write: read access alone can hold the "
                "table lock (flock works on a read-only descriptor), so give read and write or nothing"
            )
    return None


def _our_groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def _refusal(group: str, what: str, path: str, st: os.stat_result) -> MPFlightError:
    return AccessDenied(
        path,
        f"mpflight refuses {what} {path}: it belongs to {_whose(st)}, and this process (uid {os.geteuid()}) "
        f"is neither its owner nor a member of the group of a table shared with a group mode (0o660). "
        f"Remove it with mpflight.unlink({group!r}) as its owner or root, or pick another name",
    )


def check_table(group: str, path: str, st: os.stat_result) -> None:
    """Refuse a table that is neither ours nor shared with one of our groups (docs/design.md,
    "Threat model"). The file's own owner, group and mode decide: never a uid written inside it."""
    if "owner-trust" in _faults.DISABLED or st.st_uid == os.geteuid():
        return
    if stat.S_IMODE(st.st_mode) & 0o060 == 0o060 and st.st_gid in _our_groups():
        return  # a member of the table's group: trusted like its owner
    raise _refusal(group, "the table", path, st)


def check_object(group: str, what: str, path: str, st: os.stat_result, gid: int, mode: int) -> None:
    """Refuse one of a table's objects unless it is ours, or carries the table's group, the table has a
    group mode, and it has no mode bits beyond the table's."""
    if "owner-trust" in _faults.DISABLED or st.st_uid == os.geteuid():
        return
    if mode & 0o060 == 0o060 and st.st_gid == gid and not stat.S_IMODE(st.st_mode) & ~mode:
        return
    raise _refusal(group, what, path, st)


def _share(target: int | str, mode: int, gid: int) -> None:
    """Give an object we just made the table's mode (the umask narrowed it) and the table's group."""
    if isinstance(target, int):
        os.fchmod(target, mode)
        if gid not in (-1, os.getegid()):
            os.fchown(target, -1, gid)
    else:
        os.chmod(target, mode)
        if gid not in (-1, os.getegid()):
            os.chown(target, -1, gid, follow_symlinks=False)


class TableFile:
    """The table's shared-memory object: its descriptor, the lock on it, its mode and group.

    Opening checks the object (fstat on the descriptor we opened) before anything else touches it:
    another user's table is refused without being mapped or locked.
    """

    def __init__(self, group: str, *, create: bool, mode: int) -> None:
        self.group = group
        self.os_name = object_name(group)
        self.path = shm_path(self.os_name)
        self.created = False
        self.fd: int = -1
        while True:
            try:
                if create:
                    try:
                        shm = posix_ipc.SharedMemory(self.os_name, posix_ipc.O_CREX, mode=mode)
                        self.created = True
                        try:
                            os.fchmod(shm.fd, mode)  # the umask narrowed it; `mode` is what was asked for
                        except BaseException:
                            self.fd = shm.fd
                            self.remove()
                            raise
                        break
                    except posix_ipc.ExistentialError:
                        pass
                shm = posix_ipc.SharedMemory(self.os_name, 0)
                break
            except posix_ipc.ExistentialError:
                if not create:
                    versions = other_versions(group)
                    if versions:
                        raise IncompatibleTable(
                            group,
                            f"mpflight table {group!r} has layout version {versions[0]}; this mpflight reads "
                            f"version {LAYOUT_VERSION}: use the mpflight that made it",
                        ) from None
                    raise NoSuchTable(group) from None
                # Removed between our two opens: try creating again.
            except posix_ipc.PermissionsError:
                raise _permission_error(group, self.path) from None
            except OSError as e:  # ENOSPC (no inode left on /dev/shm), EMFILE, ...
                message = f"cannot open mpflight table {group!r} ({self.path}): {e}"
                if e.errno == errno.ENOSPC:
                    raise NoSpace(self.path, message) from None
                raise MPFlightError(message) from None
        self.fd = shm.fd
        try:
            st = os.fstat(self.fd)
            check_table(group, self.path, st)
            bad = check_mode(stat.S_IMODE(st.st_mode))
            if bad is not None:
                raise AccessDenied(
                    self.path, f"mpflight refuses the table {self.path}: {bad}; unlink it and make it anew"
                )
        except BaseException:
            os.close(self.fd)
            raise
        self.mode = stat.S_IMODE(st.st_mode)
        self.gid = st.st_gid
        self.lock = TableLock(self.fd)

    def remove(self) -> None:
        """Close, and unlink the name if it still leads to our object (a creation that failed)."""
        try:
            ours = os.fstat(self.fd)
            with contextlib.suppress(OSError):
                theirs = os.stat(self.path)
                if (theirs.st_ino, theirs.st_dev) == (ours.st_ino, ours.st_dev):
                    posix_ipc.unlink_shared_memory(self.os_name)
        except (OSError, posix_ipc.Error):
            pass
        finally:
            os.close(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def reserve(self, size: int) -> None:
        """Give the object ``size`` bytes, reserved now (a write tmpfs cannot back would be SIGBUS)."""
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            raise NoSpace(
                self.path, f"cannot reserve {size} bytes for table {self.group!r} in {SHM_DIR}: {e}"
            ) from None

    def map(self, size: int) -> mmap.mmap:
        return mmap.mmap(self.fd, size)

    def replaced(self) -> bool:
        """True when the name now leads to another object than ours, or to none (unlinked)."""
        try:
            shm = posix_ipc.SharedMemory(self.os_name, 0)
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            return True
        try:
            theirs = os.fstat(shm.fd)
        finally:
            shm.close_fd()
        ours = os.fstat(self.fd)
        return (theirs.st_ino, theirs.st_dev) != (ours.st_ino, ours.st_dev)

    def after_fork_in_child(self) -> None:
        old = self.fd
        self.fd = os.open(f"/proc/self/fd/{old}", os.O_RDWR)
        os.close(old)
        self.lock = TableLock(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _permission_error(group: str, path: str) -> MPFlightError:
    try:
        whose = _whose(os.stat(path))
    except OSError:
        whose = "another user"
    return AccessDenied(
        path,
        f"permission denied opening mpflight table {group!r} ({path}), which belongs to {whose}: run as "
        f"that user, or remove it with mpflight.unlink({group!r}) as its owner or root and have it made "
        f"with a group mode (Group(..., mode=0o660)) by a process of the group that shares it",
    )


class LockTimeout(TimeoutError):
    """The table lock could not be taken before the caller's deadline."""


def lock_holder(fd: int) -> int | None:
    """The pid that /proc/locks says holds an flock on the file of ``fd``, if it can be known."""
    st = os.fstat(fd)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and "->" not in line:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


class Hold:
    """One thread's own open file description of the table, on which it takes the table lock.

    Each thread locks through a description of its own, so that flock itself keeps the threads of a
    process apart as it keeps processes apart: no thread lock that an asynchronous exception could leave
    held. ``fd`` is what the thread's locked region unlocks in its ``finally``; a helper that took the
    lock for a timed wait points it at the helper's description (``TableLock.acquire``).
    """

    __slots__ = ("__weakref__", "fd", "own")

    def __init__(self, fd: int) -> None:
        self.own = self.fd = fd  # one statement: no interruption can come between the two

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # The thread ended (or forked away): its descriptions go with it. os.close is bound at definition:
        # at interpreter exit, module globals may already be gone.
        for fd in {getattr(self, "fd", -1), getattr(self, "own", -1)} - {-1}:
            try:  # noqa: SIM105 (not contextlib.suppress: it may be gone at interpreter exit)
                _close(fd)
            except OSError:
                pass


class _Request:
    """A timed wait for the lock, blocked in a helper thread on a description of its own."""

    __slots__ = ("abandoned", "fd", "granted", "mutex")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mutex = threading.Lock()
        # Released by the helper once it has the lock: a C-level lock, not an Event, whose Python-level
        # wait an asynchronous exception can leave broken ("release unlocked lock").
        self.granted = threading.Lock()
        self.granted.acquire()
        self.abandoned = False


class TableLock:
    """The table lock: flock, taken by each thread on its own open file description of the table.

    A locked region is written, everywhere, as::

        hold = lock.hold()
        try:
            lock.acquire(hold, deadline)
            ...
        finally:
            flock(hold.fd, LOCK_UN)

    CPython delivers an asynchronous exception (a signal handler's, PyThreadState_SetAsyncExc's) only
    after a call returns, at a function's entry or on a backward jump: never between the last load and
    the call of ``flock(hold.fd, LOCK_UN)``. So whatever is raised wherever, the region unlocks, and
    unlocking a description that holds nothing is harmless.
    """

    __slots__ = ("_fd", "local", "waits")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.local = threading.local()  # .hold: this thread's Hold
        # Threads blocked without a deadline, and since when (monotonic): the reaper logs long waits.
        self.waits: dict[int, float] = {}

    def _open(self) -> int:
        return os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)

    def hold(self) -> Hold:
        """This thread's Hold, made on its first use of the lock."""
        try:
            hold: Hold = self.local.hold
        except AttributeError:
            hold = self.local.hold = Hold(self._open())
        return hold

    def acquire(self, hold: Hold, deadline: float | None = None) -> None:
        """Take the lock on ``hold`` (inside the try whose finally unlocks it); by ``deadline``, if given.

        Raises LockTimeout when the deadline passes first. Without one, a wait blocks in flock itself.
        """
        if hold.fd != hold.own:  # a helper's description from an earlier timed wait, now unlocked
            extra, hold.fd = hold.fd, hold.own
            os.close(extra)
        try:
            fcntl.flock(hold.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if deadline is None or "lock-deadline" in _faults.DISABLED:
            tid = threading.get_ident()
            self.waits[tid] = time.monotonic()
            try:
                fcntl.flock(hold.fd, fcntl.LOCK_EX)
            finally:
                self.waits.pop(tid, None)
            return
        self._timed(hold, deadline)

    def _timed(self, hold: Hold, deadline: float) -> None:
        """Wait for the lock until ``deadline`` while a helper thread blocks in flock for us: a holder
        that is stopped (SIGSTOP) or slow cannot keep a caller past its deadline."""
        if deadline <= time.monotonic():
            raise LockTimeout("gave up waiting for the table lock")
        request = _Request(self._open())
        try:
            start_thread(
                threading.Thread(target=_take_for, args=(request, hold), daemon=True, name="mpflight-lock")
            )
            request.granted.acquire(True, max(deadline - time.monotonic(), 0.0))
        finally:
            with request.mutex:
                if hold.fd != request.fd:
                    request.abandoned = True  # the helper gives the lock back when it gets it
        if hold.fd != request.fd:
            raise LockTimeout("gave up waiting for the table lock")


def _take_for(request: _Request, hold: Hold) -> None:
    """In a helper thread: block in flock, then hand the lock to the waiting caller, or give it back.

    Handing it over is the one store ``hold.fd = request.fd``: whatever else happens, the lock is
    either the caller's (its region unlocks ``hold.fd``) or unlocked here."""
    try:
        fcntl.flock(request.fd, fcntl.LOCK_EX)
        with request.mutex:
            if not request.abandoned:
                hold.fd = request.fd
        request.granted.release()
    finally:
        if hold.fd != request.fd:
            fcntl.flock(request.fd, fcntl.LOCK_UN)
            os.close(request.fd)


class Semaphores:
    """The per-slot wake-up semaphores of one table, opened by the name each slot records, and cached.

    Only ``ensure`` creates one: under the table lock, for the first waiter of a slot, with O_CREX and
    a random name (so nobody can have made it before us), the table's mode and the table's group.
    Waiting and posting open the semaphore the slot names and never create one: a post is a hint, and
    a waiter re-reads the state on every slice anyway. (sem_open gives no descriptor to fstat: the
    names are what keeps other users' semaphores out; they are recorded only inside the table.)
    """

    def __init__(
        self,
        group: str,
        token: Callable[[int], int],
        set_token: Callable[[int, int], None],
        mode: int,
        gid: int,
    ) -> None:
        self._group = group
        self._token = token
        self._set_token = set_token
        self._mode = mode
        self._gid = gid
        self._open: dict[int, tuple[int, posix_ipc.Semaphore]] = {}
        # Handles of replaced semaphores: another thread may still wait on one, so close them last.
        self._retired: list[posix_ipc.Semaphore] = []

    def name(self, slot: int) -> str | None:
        token = self._token(slot)
        return semaphore_name(self._group, slot, token) if token else None

    def _get(self, slot: int) -> posix_ipc.Semaphore | None:
        token = self._token(slot)
        if not token:
            return None
        cached = self._open.get(slot)
        if cached is not None and cached[0] == token:
            return cached[1]
        try:
            sem = posix_ipc.Semaphore(semaphore_name(self._group, slot, token), 0)
        except (posix_ipc.Error, OSError):  # gone (unlinked under us), or garbage in the slot
            return None
        self._keep(slot, token, sem)
        return sem

    def _keep(self, slot: int, token: int, sem: posix_ipc.Semaphore) -> None:
        old = self._open.get(slot)
        self._open[slot] = (token, sem)
        if old is not None and old[1] is not sem:
            self._retired.append(old[1])

    def ensure(self, slot: int) -> None:
        """Under the lock, before a waiter registers: make sure slot ``slot`` has its semaphore.

        Raises MPFlightError (having recorded nothing) when none can be made, e.g. /dev/shm is full.
        """
        if self._get(slot) is not None:
            return
        for _ in range(NAME_TRIES):
            token = new_token(1)
            name = semaphore_name(self._group, slot, token)
            try:
                sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=self._mode, initial_value=0)
            except posix_ipc.ExistentialError:
                continue
            except posix_ipc.PermissionsError:
                raise AccessDenied(
                    sem_path(name), f"permission denied creating semaphore {sem_path(name)}"
                ) from None
            except (posix_ipc.Error, OSError) as e:  # ENOSPC comes as a bare OSError
                if "space-errors" in _faults.DISABLED:
                    raise
                message = f"cannot create semaphore {sem_path(name)} for table {self._group!r}: {e}"
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    raise NoSpace(sem_path(name), f"{message} (is {SHM_DIR} full?)") from None
                raise MPFlightError(message) from None
            try:
                _share(sem_path(name), self._mode, self._gid)
            except OSError as e:
                sem.unlink()
                sem.close()
                raise AccessDenied(
                    sem_path(name),
                    f"cannot give semaphore {sem_path(name)} the table's mode {self._mode:#o} and group "
                    f"{self._gid}: {e}",
                ) from None
            self._set_token(slot, token)
            self._keep(slot, token, sem)
            return
        raise AccessDenied(
            self._group,
            f"cannot create a semaphore for slot {slot} of table {self._group!r}: {NAME_TRIES} names "
            "in a row exist already",
        )

    def wait(self, slot: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a post; False when the time ran out or a signal came."""
        sem = self._get(slot)
        if sem is None:  # no semaphore to wait on (damage): the caller re-reads the state after the slice
            time.sleep(max(timeout, 0.0))
            return False
        try:
            sem.acquire(max(timeout, 0.0))
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False
        return True

    def post(self, slot: int, times: int) -> None:
        sem = self._get(slot)
        if sem is None:
            return  # a post is a hint: the waiters see DONE on their next slice
        for _ in range(times):
            sem.release()

    def close(self) -> None:
        for _, sem in self._open.values():
            sem.close()
        for sem in self._retired:
            sem.close()
        self._open.clear()
        self._retired.clear()


class SegmentExists(MPFlightError):
    """A segment of this name exists already (the caller picks another name)."""


def write_segment(name: str, payload: bytes | memoryview, mode: int, gid: int) -> None:
    """Create segment ``name`` (O_CREX) holding ``payload``, with the table's mode and group; reserving
    first makes a full /dev/shm an error."""
    size = len(payload)
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode)
    except posix_ipc.ExistentialError:
        raise SegmentExists(name) from None
    except posix_ipc.PermissionsError:
        raise AccessDenied(
            shm_path(name), f"permission denied creating result segment {shm_path(name)}"
        ) from None
    except OSError as e:
        raise SegmentFull(
            shm_path(name), f"cannot create result segment {shm_path(name)}: {e.strerror}"
        ) from None
    try:
        try:
            _share(shm.fd, mode, gid)
        except OSError as e:
            raise AccessDenied(
                shm_path(name),
                f"cannot give result segment {shm_path(name)} the table's mode {mode:#o} "
                f"and group {gid}: {e}",
            ) from None
        try:
            if "reserve" in _faults.DISABLED:
                os.ftruncate(shm.fd, size)  # what the failure model's test shows to be fatal
            else:
                os.posix_fallocate(shm.fd, 0, size)
        except OSError as e:
            raise SegmentFull(
                shm_path(name), f"no room in {SHM_DIR} for a result of {size} bytes: {e.strerror}"
            ) from None
        with mmap.mmap(shm.fd, size) as mm:
            mm[:] = payload
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        shm.close_fd()


def map_segment(group: str, name: str, size: int, gid: int, mode: int) -> mmap.mmap:
    """Map segment ``name`` for reading, once fstat on it says it is trusted; it must hold ``size`` bytes."""
    try:
        shm = posix_ipc.SharedMemory(name, 0, read_only=True)
    except posix_ipc.ExistentialError:
        raise DamagedTable(shm_path(name), f"result segment {shm_path(name)} is missing") from None
    except posix_ipc.PermissionsError:
        raise AccessDenied(
            shm_path(name), f"permission denied reading result segment {shm_path(name)}"
        ) from None
    try:
        st = os.fstat(shm.fd)
        check_object(group, "the result segment", shm_path(name), st, gid, mode)
        if st.st_size < size:
            raise DamagedTable(shm_path(name), f"result segment {name} is shorter than its slot says")
        return mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()


def unlink_segment(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError, OSError):
        return False
    return True


def unlink_all(group: str) -> bool:
    """Remove ``group``'s table, semaphores and segments; True if anything was there."""
    table = object_name(group)
    stem = table.lstrip("/")
    removed = False
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        entries = []
    for entry in entries:
        if entry.startswith(f"{stem}{SEP}"):
            removed |= unlink_segment(f"/{entry}")
        elif entry.startswith(f"sem.{stem}{SEP}"):
            # Another user's object (squatting our names) is left for its owner or root.
            with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError, OSError):
                posix_ipc.unlink_semaphore("/" + entry.removeprefix("sem."))
                removed = True
    with contextlib.suppress(posix_ipc.ExistentialError, posix_ipc.PermissionsError, OSError):
        posix_ipc.unlink_shared_memory(table)
        removed = True
    return removed


_TABLE_ENTRY: Final = re.compile(r"mpf(\d+)@([A-Za-z0-9._-]+(?:\+[A-Za-z0-9._-]+)?)")


def other_versions(group: str) -> list[int]:
    """Layout versions other than ours of which a table named ``group`` exists here."""
    found = []
    for entry in shm_entries():
        m = _TABLE_ENTRY.fullmatch(entry)
        if m and m.group(2) == group and int(m.group(1)) != LAYOUT_VERSION:
            found.append(int(m.group(1)))
    return sorted(found)


def shm_entries() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except OSError:
        return []


def table_objects() -> list[tuple[int, str]]:
    """(layout version, OS name) of every mpflight table object in /dev/shm, of any layout version."""
    found = []
    for entry in sorted(shm_entries()):
        m = _TABLE_ENTRY.fullmatch(entry)
        if m:
            found.append((int(m.group(1)), f"/{entry}"))
    return found


def map_read_only(name: str, os_name: str) -> mmap.mmap:
    """The table object ``os_name`` (of the table ``name``) mapped whole and read-only, once fstat on it
    says it is trusted. Opened without O_CREAT and mapped PROT_READ: it is never created, initialised,
    locked or written through this mapping, and no pid namespace is asked about (nothing read here is a
    pid to check). Raises NoSuchTable (it is gone), AccessDenied (not ours, or refused), NotInitialised
    (it has no header yet: its creator has not reserved it)."""
    path = shm_path(os_name)
    try:
        shm = posix_ipc.SharedMemory(os_name, 0, read_only=True)
    except posix_ipc.ExistentialError:
        raise NoSuchTable(name) from None
    except posix_ipc.PermissionsError:
        raise _permission_error(name, path) from None
    except OSError as e:  # EMFILE, ...
        raise MPFlightError(f"cannot open mpflight table {name!r} ({path}): {e}") from None
    try:
        st = os.fstat(shm.fd)
        check_table(name, path, st)
        if st.st_size < HEADER_SIZE:
            raise NotInitialised(name)
        return mmap.mmap(shm.fd, st.st_size, prot=mmap.PROT_READ)
    except OSError as e:  # ENOMEM, ...
        raise MPFlightError(f"cannot map mpflight table {name!r} ({path}): {e}") from None
    finally:
        shm.close_fd()


def table_headers() -> list[tuple[str, bytes | None]]:
    """(OS name, first header bytes or None if unreadable) of every table of our layout version here."""
    found: list[tuple[str, bytes | None]] = []
    for entry in sorted(shm_entries()):
        m = _TABLE_ENTRY.fullmatch(entry)
        if not m or int(m.group(1)) != LAYOUT_VERSION:
            continue
        header: bytes | None = None
        try:
            shm = posix_ipc.SharedMemory(f"/{entry}", 0, read_only=True)
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            found.append((f"/{entry}", None))
            continue
        try:
            st = os.fstat(shm.fd)
            try:
                check_table("", shm_path(entry), st)
                trusted = True
            except MPFlightError:
                trusted = False  # not ours: its bytes say nothing we may believe (not even its name)
            if trusted and st.st_size >= HEADER_SIZE:
                with mmap.mmap(shm.fd, HEADER_SIZE, prot=mmap.PROT_READ) as mm:
                    header = mm[:HEADER_SIZE]
        finally:
            shm.close_fd()
        found.append((f"/{entry}", header))
    return found
