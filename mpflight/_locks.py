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
import fcntl
import hashlib
import mmap
import os
import pwd
import re
import stat
import sys
import threading
import time
from typing import Final

import posix_ipc

from . import _faults
from ._errors import MPFlightError
from ._layout import HEADER_SIZE, LAYOUT_VERSION

# Every object name starts with this, then the layout version: `ls /dev/shm | grep mpf` finds them all.
PREFIX: Final = f"/mpf{LAYOUT_VERSION}@"
# Separates the group's name from an object's suffix; never part of a group name ([A-Za-z0-9._-]).
SEP: Final = "@"
# macOS caps semaphore and shm names at 31 bytes (PSEMNAMLEN, PSHMNAMLEN); Linux at NAME_MAX (255)
# less the "sem." that glibc puts in front of a semaphore's file name.
NAME_LIMIT: Final = 31 if sys.platform == "darwin" else 250
SHM_DIR: Final = "/dev/shm"


class NoSuchTable(MPFlightError):
    """There is no table of this name (raised when attaching without creating)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no mpflight table named {name!r}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name,))


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


def semaphore_name(group: str, slot: int) -> str:
    return object_name(group, f"{SEP}s{slot}")


def segment_name(group: str, nonce: int, slot: int, gen: int) -> str:
    """A result segment's name: the table's nonce keeps apart the segments of a table made anew
    under the same name while calls of the old one still finish."""
    return object_name(group, f"{SEP}r{nonce:08x}.{slot}.{gen & 0xFFFFFFFF}")


def _shm_path(os_name: str) -> str:
    return f"{SHM_DIR}/{os_name.lstrip('/')}"


def _whose(os_name: str) -> str:
    try:
        st = os.stat(_shm_path(os_name))
    except OSError:
        return "another user"
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = f"uid {st.st_uid}"
    return f"user {user} (mode {stat.S_IMODE(st.st_mode):#o})"


def _permission_error(group: str, os_name: str) -> MPFlightError:
    return MPFlightError(
        f"permission denied opening mpflight table {group!r} ({_shm_path(os_name)}), which belongs to "
        f"{_whose(os_name)}: run as that user, or have the table created with a wider mode "
        f"(Group(..., mode=0o660) for a shared group) after removing it with mpflight.unlink({group!r})"
    )


class TableFile:
    """The table's shared-memory object: its descriptor and the lock on it."""

    def __init__(self, group: str, *, create: bool, mode: int) -> None:
        self.group = group
        self.os_name = object_name(group)
        self.created = False
        while True:
            try:
                if create:
                    try:
                        shm = posix_ipc.SharedMemory(self.os_name, posix_ipc.O_CREX, mode=mode)
                        self.created = True
                        os.fchmod(shm.fd, mode)  # the umask narrowed it; `mode` is what was asked for
                        break
                    except posix_ipc.ExistentialError:
                        pass
                shm = posix_ipc.SharedMemory(self.os_name, 0)
                break
            except posix_ipc.ExistentialError:
                if not create:
                    versions = other_versions(group)
                    if versions:
                        raise MPFlightError(
                            f"mpflight table {group!r} has layout version {versions[0]}; this mpflight reads "
                            f"version {LAYOUT_VERSION}: use the mpflight that made it"
                        ) from None
                    raise NoSuchTable(group) from None
                # Removed between our two opens: try creating again.
            except posix_ipc.PermissionsError:
                raise _permission_error(group, self.os_name) from None
        self.fd: int = shm.fd
        self.lock = TableLock(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def reserve(self, size: int) -> None:
        """Give the object ``size`` bytes, reserved now (a write tmpfs cannot back would be SIGBUS)."""
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            raise MPFlightError(
                f"cannot reserve {size} bytes for table {self.group!r} in {SHM_DIR}: {e}"
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
        self.own = fd
        self.fd = fd

    def __del__(self) -> None:  # the thread ended (or forked away): its descriptions go with it
        for fd in {self.fd, self.own}:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Request:
    """A timed wait for the lock, blocked in a helper thread on a description of its own."""

    __slots__ = ("abandoned", "fd", "granted", "mutex")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mutex = threading.Lock()
        self.granted = threading.Event()
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

    __slots__ = ("_fd", "_local", "waits")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._local = threading.local()
        # Threads blocked without a deadline, and since when (monotonic): the reaper logs long waits.
        self.waits: dict[int, float] = {}

    def _open(self) -> int:
        return os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)

    def hold(self) -> Hold:
        """This thread's Hold, made on its first use of the lock."""
        try:
            hold: Hold = self._local.hold
        except AttributeError:
            hold = self._local.hold = Hold(self._open())
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
        if deadline is None:
            ident = threading.get_ident()
            self.waits[ident] = time.monotonic()
            try:
                fcntl.flock(hold.fd, fcntl.LOCK_EX)
            finally:
                self.waits.pop(ident, None)
            return
        self._timed(hold, deadline)

    def _timed(self, hold: Hold, deadline: float) -> None:
        """Wait for the lock until ``deadline`` while a helper thread blocks in flock for us: a holder
        that is stopped (SIGSTOP) or slow cannot keep a caller past its deadline."""
        if deadline <= time.monotonic():
            raise LockTimeout("gave up waiting for the table lock")
        request = _Request(self._open())
        threading.Thread(target=_take_for, args=(request, hold), daemon=True, name="mpflight-lock").start()
        try:
            if request.granted.wait(max(deadline - time.monotonic(), 0.0)):
                return
        finally:
            with request.mutex:
                if hold.fd != request.fd:
                    request.abandoned = True  # the helper unlocks and closes when it gets the lock
        raise LockTimeout("gave up waiting for the table lock")


def _take_for(request: _Request, hold: Hold) -> None:
    """In a helper thread: block in flock, then hand the lock to the waiting caller, or give it back."""
    try:
        fcntl.flock(request.fd, fcntl.LOCK_EX)
    except OSError:
        os.close(request.fd)
        return
    with request.mutex:
        if not request.abandoned:
            hold.fd = request.fd  # the caller's region unlocks this description now
            request.granted.set()
            return
    fcntl.flock(request.fd, fcntl.LOCK_UN)
    os.close(request.fd)


class Semaphores:
    """The per-slot wake-up semaphores of one table, opened (or created) on first use and cached."""

    def __init__(self, group: str, mode: int) -> None:
        self._group = group
        self._mode = mode
        self._open: dict[int, posix_ipc.Semaphore] = {}

    def _get(self, slot: int) -> posix_ipc.Semaphore:
        sem = self._open.get(slot)
        if sem is None:
            name = semaphore_name(self._group, slot)
            try:
                sem = posix_ipc.Semaphore(name, posix_ipc.O_CREAT, mode=self._mode, initial_value=0)
            except posix_ipc.PermissionsError:
                raise _permission_error(self._group, name) from None
            if self._mode & 0o077:
                # The umask narrowed a mode that was widened on purpose (shared with other users).
                with contextlib.suppress(OSError):
                    os.chmod(f"{SHM_DIR}/sem.{name.lstrip('/')}", self._mode)
            sem = self._open.setdefault(slot, sem)
        return sem

    def wait(self, slot: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a post; False when the time ran out or a signal came."""
        try:
            self._get(slot).acquire(max(timeout, 0.0))
        except (posix_ipc.BusyError, posix_ipc.SignalError):
            return False
        return True

    def post(self, slot: int, times: int) -> None:
        sem = self._get(slot)
        for _ in range(times):
            sem.release()

    def close(self) -> None:
        for sem in self._open.values():
            sem.close()
        self._open.clear()


class SegmentFull(MPFlightError):
    """/dev/shm has no room for a result segment."""


def write_segment(name: str, payload: bytes | memoryview, mode: int) -> None:
    """Create segment ``name`` holding ``payload``; reserving first makes a full /dev/shm an error."""
    size = len(payload)
    for _ in range(2):
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode)
            if mode & 0o077:
                os.fchmod(shm.fd, mode)  # the umask narrowed a mode widened on purpose
            break
        except posix_ipc.ExistentialError:
            # Left by an owner of an earlier generation that died: nobody can be reading it.
            unlink_segment(name)
    else:
        raise MPFlightError(f"cannot create result segment {name}")
    try:
        try:
            if "reserve" in _faults.DISABLED:
                os.ftruncate(shm.fd, size)  # what the failure model's test shows to be fatal
            else:
                os.posix_fallocate(shm.fd, 0, size)
        except OSError as e:
            raise SegmentFull(f"no room in {SHM_DIR} for a result of {size} bytes: {e.strerror}") from None
        with mmap.mmap(shm.fd, size) as mm:
            mm[:] = payload
    except BaseException:
        unlink_segment(name)
        raise
    finally:
        shm.close_fd()


def map_segment(name: str, size: int) -> mmap.mmap:
    """Map segment ``name`` for reading; it must hold at least ``size`` bytes."""
    try:
        shm = posix_ipc.SharedMemory(name, 0, read_only=True)
    except posix_ipc.ExistentialError:
        raise MPFlightError(f"result segment {name} is missing") from None
    except posix_ipc.PermissionsError:
        raise MPFlightError(f"permission denied reading result segment {name}") from None
    try:
        if os.fstat(shm.fd).st_size < size:
            raise MPFlightError(f"result segment {name} is shorter than its slot says")
        return mmap.mmap(shm.fd, size, prot=mmap.PROT_READ)
    finally:
        shm.close_fd()


def unlink_segment(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory(name)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
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
            try:
                posix_ipc.unlink_semaphore("/" + entry.removeprefix("sem."))
                removed = True
            except posix_ipc.ExistentialError:
                pass
    try:
        posix_ipc.unlink_shared_memory(table)
        removed = True
    except posix_ipc.ExistentialError:
        pass
    return removed


_TABLE_ENTRY: Final = re.compile(r"mpf(\d+)@([A-Za-z0-9._-]+)")


def other_versions(group: str) -> list[int]:
    """Layout versions other than ours of which a table named ``group`` exists here."""
    found = []
    for entry in _shm_entries():
        m = _TABLE_ENTRY.fullmatch(entry)
        if m and m.group(2) == group and int(m.group(1)) != LAYOUT_VERSION:
            found.append(int(m.group(1)))
    return sorted(found)


def _shm_entries() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except OSError:
        return []


def table_headers() -> list[tuple[str, bytes | None]]:
    """(OS name, first header bytes or None if unreadable) of every table of our layout version here."""
    found: list[tuple[str, bytes | None]] = []
    for entry in sorted(_shm_entries()):
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
            if os.fstat(shm.fd).st_size >= HEADER_SIZE:
                with mmap.mmap(shm.fd, HEADER_SIZE, prot=mmap.PROT_READ) as mm:
                    header = mm[:HEADER_SIZE]
        finally:
            shm.close_fd()
        found.append((f"/{entry}", header))
    return found
