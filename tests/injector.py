"""Raise an exception at one chosen point where CPython 3.11 can deliver an asynchronous one, inside mpflight.

A signal handler's exception (KeyboardInterrupt, a SIGALRM timeout, Celery's soft time limit) and one
set by ``PyThreadState_SetAsyncExc`` are raised only where the interpreter checks its "eval breaker":

- at function entry, and on resuming a generator after ``yield`` (``RESUME`` with oparg < 2; not on
  resuming a coroutine after ``await``);
- right after a ``CALL`` or ``CALL_FUNCTION_EX`` returns;
- right after a backward jump is taken (``JUMP_BACKWARD``, ``POP_JUMP_BACKWARD_IF_*``).

Nowhere else: not between two plain bytecodes, not on entering a ``with`` body or an ``except`` or
``finally`` block. So the injector raises only at those points, as the exception would appear there:

- entry: from the trace function's 'call' event (the frame fails at its ``RESUME``);
- after a call of a builtin function or method (``flock``, ``Lock.acquire``, ``list.append``, the
  posix_ipc methods): from the profile function's 'c_return' event, so that the call's effect has
  happened and the exception is attributed to the ``CALL`` instruction, as CPython attributes it (the
  exception table of the ``CALL``, not of the next instruction, decides which ``try`` catches it);
- after any other call, and after a backward jump: from the trace function's 'opcode' event of the next
  instruction. The exception is then attributed to that instruction, while CPython attributes it to the
  code unit just before it (the call's last inline cache, or the one before the jump's target): where
  the two lie in different ``try`` ranges (a ``return f()`` inside ``try``/``finally``: the next
  instruction is the first of the inlined ``finally``), raising there would demand the impossible, so
  such a point is not raised at and is listed in ``Injector.boundaries`` instead. In 3.11 those are
  (almost always) calls of Python functions, which the interpreter inlines: it checks nothing when they
  return, so nothing can be delivered there at all.

A dry run (``target=None``) lists the points one call path passes, in order; each is named by its kind,
function, offset and occurrence (the n-th time that very point was passed), so that a later run raises
at the same point even when threads interleave differently.
"""

from __future__ import annotations

import dis
import functools
import inspect
import itertools
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any, NamedTuple

import mpflight

PACKAGE = str(Path(mpflight.__file__).resolve().parent) + "/"

_RESUME = dis.opmap["RESUME"]
_CALLS = frozenset({dis.opmap["CALL"], dis.opmap["CALL_FUNCTION_EX"]})
# Backward jumps that check the eval breaker when taken (JUMP_BACKWARD_NO_INTERRUPT does not).
_BACK_JUMPS = frozenset(
    dis.opmap[n]
    for n in (
        "JUMP_BACKWARD",
        "POP_JUMP_BACKWARD_IF_FALSE",
        "POP_JUMP_BACKWARD_IF_TRUE",
        "POP_JUMP_BACKWARD_IF_NONE",
        "POP_JUMP_BACKWARD_IF_NOT_NONE",
    )
)
assert sys.version_info[:2] == (3, 11), "the delivery points above are CPython 3.11's; check them anew"


class Point(NamedTuple):
    """One delivery point on a call path."""

    kind: str  # "entry", "after-c-call", "after-call", "back-edge"
    function: str  # the code's qualified name
    line: int
    offset: int  # of the instruction at which (or, for after-c-call, just after which) it is raised
    occurrence: int  # the n-th time this (kind, code, offset) was passed on the path
    filename: str

    def where(self) -> str:
        return f"{self.kind} {self.function}:{self.line}@{self.offset}#{self.occurrence}"


class _CodeInfo(NamedTuple):
    code: bytes
    following: dict[int, int]  # offset of an instruction -> offset of the next one (caches skipped)
    targets: dict[int, int]  # offset of a backward jump -> its target
    table: list[Any]  # the exception table entries


@functools.cache
def _info(code: CodeType) -> _CodeInfo:
    instrs = list(dis.get_instructions(code))
    following = {a.offset: b.offset for a, b in itertools.pairwise(instrs)}
    targets = {i.offset: i.argval for i in instrs if i.opcode in _BACK_JUMPS}
    return _CodeInfo(code.co_code, following, targets, dis._parse_exception_table(code))  # type: ignore[attr-defined]


def _handler(info: _CodeInfo, offset: int) -> tuple[int, int, bool] | None:
    for e in info.table:
        if e.start <= offset < e.end:
            return (e.target, e.depth, e.lasti)
    return None


def _ours(code: CodeType) -> bool:
    # A finalizer is left out: CPython prints and ignores whatever a __del__ raises ("Exception
    # ignored in ..."), so an exception delivered there changes nothing but what it was closing.
    return code.co_filename.startswith(PACKAGE) and code.co_name != "__del__"


def _internal_thread() -> bool:
    return threading.current_thread().name.startswith("mpflight-")


def _loop_callback(frame: FrameType) -> bool:
    """Whether mpflight code runs here as an asyncio callback (a task's done-callback): asyncio's
    Handle._run catches and reports whatever such a callback raises, so it never reaches the caller;
    mpflight's callbacks only tidy up, idempotently (and the reaper finishes what one leaves)."""
    f, outer = frame, frame
    while f is not None and _ours(f.f_code):
        f, outer = f.f_back, f
    if outer.f_code.co_flags & inspect.CO_COROUTINE:  # a task's step, not a callback
        return False
    return f is not None and f.f_code.co_name == "_run" and f.f_code.co_filename.endswith("events.py")


class Injector:
    """Count the delivery points in mpflight frames (target None), or raise ``exc`` at ``target``.

    ``install()`` traces every thread started until ``uninstall()`` (run the call in one);
    ``paused`` (set by the test's fn) keeps the points of mpflight calls that fn makes out of it, in
    the thread that sets it only (fn may run in an executor thread while the call goes on in another).
    """

    def __init__(self, target: Point | None = None, exc: type[BaseException] | None = None) -> None:
        self.target = target
        self.exc = exc
        self.points: list[Point] = []  # the dry run's, in order
        self.boundaries: set[tuple[str, int, int]] = set()  # (function, line, offset) not raised at
        self.fired: Point | None = None
        self.fired_in: str | None = None  # the name of the thread it was raised in
        self.fired_at: float | None = None  # when (monotonic)
        self._paused: set[int] = set()  # the threads whose points are paused
        # Called once, in the traced thread, the first time a function of this name is entered (before
        # any point of that entry is raised at): a test's way to act at a moment of the call path.
        self.on_entry: dict[str, Callable[[], object]] = {}
        self.armed = False
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, CodeType, int], int] = {}
        self._last: dict[FrameType, int] = {}  # per frame, the offset of its last 'opcode' event
        self._c_returned: dict[FrameType, int] = {}  # per frame, the CALL whose builtin just returned

    @property
    def paused(self) -> bool:
        return threading.get_ident() in self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        if value:
            self._paused.add(threading.get_ident())
        else:
            self._paused.discard(threading.get_ident())

    # -- installation --------------------------------------------------------------------------

    def install(self) -> None:
        """Trace every thread started from now on (the caller's thread is started after this)."""
        self.armed = True
        threading.settrace(self._global)
        threading.setprofile(self._profile)

    def uninstall(self, disarm: bool = True) -> None:
        """Trace no more new threads; with ``disarm`` False, the threads traced so far keep their points
        (a call still running in one may yet reach the target): ``disarm()`` later."""
        threading.settrace(None)  # type: ignore[arg-type]
        threading.setprofile(None)  # type: ignore[arg-type]
        if disarm:
            self.disarm()

    def disarm(self) -> None:
        self.armed = False
        self._last.clear()
        self._c_returned.clear()

    def __enter__(self) -> Injector:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # -- the hooks -----------------------------------------------------------------------------

    def _active(self) -> bool:
        return self.armed and threading.get_ident() not in self._paused and self.fired is None

    def _point(self, frame: FrameType, kind: str, offset: int) -> None:
        code = frame.f_code
        with self._lock:
            ident = (kind, code, offset)
            n = self._seen[ident] = self._seen.get(ident, 0) + 1
            point = Point(kind, code.co_qualname, frame.f_lineno, offset, n, code.co_filename)
            if self.target is None:
                self.points.append(point)
                return
            if point != self.target:
                return
            self.fired = point
            self.fired_at = time.monotonic()
            self.fired_in = threading.current_thread().name
        assert self.exc is not None
        raise self.exc(point.where())

    def _global(self, frame: FrameType, event: str, arg: object) -> Any:
        # Threads that mpflight starts for itself (a handle's pool, wait threads, the lock helper, the
        # reaper) are no target: signals are handled in the main thread, and nobody outside mpflight
        # holds their ids to aim PyThreadState_SetAsyncExc at. The caller's threads are.
        if not self.armed or not _ours(frame.f_code) or _internal_thread() or _loop_callback(frame):
            return None
        frame.f_trace_opcodes = True
        if event == "call" and self.on_entry:
            with self._lock:
                action = self.on_entry.pop(frame.f_code.co_qualname, None)
            if action is not None:
                action()
        if event == "call" and self._active():
            code, lasti = frame.f_code.co_code, frame.f_lasti
            if code[lasti] == _RESUME and code[lasti + 1] < 2:  # function entry, or resumed after yield
                self._point(frame, "entry", lasti)
        return self._local

    def _local(self, frame: FrameType, event: str, arg: object) -> Any:
        if event == "opcode" and self.armed:
            self._opcode(frame)
        return self._local

    def _opcode(self, frame: FrameType) -> None:
        lasti = frame.f_lasti
        prev = self._last.get(frame)
        self._last[frame] = lasti
        if prev is None or not self._active():
            return
        info = _info(frame.f_code)
        op = info.code[prev]
        if op in _CALLS:
            if info.following.get(prev) != lasti:  # the call raised: its handler runs; nothing is checked
                return
            if self._c_returned.pop(frame, None) == prev:  # a builtin: already a point at its c_return
                return
            kind = "after-call"
        elif op in _BACK_JUMPS:
            if info.targets.get(prev) != lasti:  # not taken
                return
            kind = "back-edge"
        else:
            return
        # CPython attributes the exception to the code unit before `lasti`: raise only where that one
        # and `lasti` are caught by the same handler.
        if _handler(info, lasti - 2) != _handler(info, lasti):
            with self._lock:
                self.boundaries.add((frame.f_code.co_qualname, frame.f_lineno, lasti))
            return
        self._point(frame, kind, lasti)

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "c_return" or not self.armed or not _ours(frame.f_code) or _internal_thread():
            return
        if _loop_callback(frame):
            return
        self._c_returned[frame] = frame.f_lasti
        if self._active():
            self._point(frame, "after-c-call", frame.f_lasti)
