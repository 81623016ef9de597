"""Process identity and liveness: the only module that touches psutil.

A process is (pid, start time). The start time is kept in clock ticks since boot, which never change
for a process: psutil's ``create_time()`` adds a boot time that it re-reads from the wall clock, so
two readings around an NTP step would differ. We subtract the boot time read around the same call and
retry when the two boot-time readings disagree, so a clock step can never make a live process look
like another one.
"""

from __future__ import annotations

import os
from typing import Final

import psutil

from . import _faults

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_ATTEMPTS: Final = 5  # a clock stepped this many times in a row between two reads is not a clock

# Linux never hands out pids above 2**22 (PID_MAX_LIMIT); a larger one read from a table is garbage.
PID_MAX: Final = 1 << 22

_identity: tuple[int, int] | None = None


def _start_ticks(proc: psutil.Process) -> int:
    """Start time of ``proc`` in clock ticks since boot, immune to steps of the wall clock."""
    if "boot-relative" in _faults.DISABLED:
        return round(proc.create_time() * _TICKS)
    for _ in range(_ATTEMPTS):
        before = psutil.boot_time()
        created = psutil.Process(proc.pid).create_time()  # a fresh object: Process caches create_time
        after = psutil.boot_time()
        if before == after:
            return round((created - before) * _TICKS)
    raise RuntimeError("the wall clock kept moving while reading a process's start time")


def identity() -> tuple[int, int]:
    """(pid, start ticks) of this process; computed once, and again after ``forget_identity``."""
    global _identity
    if _identity is None:
        pid = os.getpid()
        _identity = (pid, _start_ticks(psutil.Process(pid)))
    return _identity


def start_ticks(pid: int) -> int | None:
    """Start ticks of the live process ``pid``, or None when there is none (or it is a zombie)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE and "zombie-check" not in _faults.DISABLED:
            return None
        return _start_ticks(proc)
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return None


def is_alive(pid: int, ticks: int) -> bool:
    """True when the process that was (pid, ticks) still runs: not gone, not a zombie, not a reused pid."""
    if not 0 < pid <= PID_MAX:
        return False
    if "zombie-check" in _faults.DISABLED or "start-time" in _faults.DISABLED:
        return _naive_is_alive(pid, ticks)
    try:
        found = start_ticks(pid)
    except psutil.AccessDenied:
        # Another user's process whose details we may not read: its pid exists, so assume it is the one.
        return True
    return found == ticks


def _naive_is_alive(pid: int, ticks: int) -> bool:
    """What the tests show to be wrong: psutil.is_running (true for zombies), or a bare pid."""
    if "start-time" in _faults.DISABLED:
        return psutil.pid_exists(pid) and ("zombie-check" in _faults.DISABLED or start_ticks(pid) is not None)
    try:
        proc = psutil.Process(pid)
        return proc.is_running() and _start_ticks(proc) == ticks
    except psutil.Error:
        return psutil.pid_exists(pid)


def pid_namespace() -> int:
    """Inode of this process's pid namespace: pids mean the same only to processes that share it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def forget_identity() -> None:
    """Called in a forked child, whose identity is its own."""
    global _identity
    _identity = None
