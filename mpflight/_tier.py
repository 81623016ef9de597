"""The seam between how a caller of a key becomes owner or waiter, and how the API drives a caller.

A ``Tier`` makes ``Entry`` objects, one per caller; the drivers (mpflight._drivers) use nothing else::

    with tier.caller(deadline) as entry:      # an exception leaving the block ends what entry holds
        role = entry.enter(key, tid, blocking)
        OWN:   entry.own(fn, args, kwargs) runs fn here and hands the outcome on: (value, shared)
        JOIN:  entry.wait(key, detached) returns the outcome (or raises fn's exception, AbortError)
        ALONE: fn runs here, uncoalesced

The shared-memory table is the first tier (``ShmTier``). Tiers compose: ``Stacked`` puts a next tier
(across hosts, say) behind the table. The caller that owns a key in the table is the one that talks to
the next tier: it owns there too and runs fn, or it waits there and publishes what it gets to the
table's waiters. The next tier keeps up to TIER_CAP bytes of its own per call in the table's slot
(its entry's ``noted``), which inflight() shows, and hears through ``on_event`` when the table aborts or frees
a call that carried them (its owner died, a reaper reclaimed it), in whichever process that happens
and stacks the tier.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol, TypeVar

from . import _protocol
from ._errors import AbortError, WaitTimeout, start_thread
from ._protocol import ALONE, JOIN, OWN, Call, Options, Result, RunHere
from ._registry import Attachment, Inside, registry

log = logging.getLogger("mpflight")

E = TypeVar("E", bound="Entry")
T = TypeVar("T")


class Entry(Protocol):
    """One caller's part in one call of a key, as a tier gives it. A context manager: an exception
    leaving its block ends what the caller registered (its claim is freed or aborted, its wait left),
    and the block's end ends the entry, unless it was handed to another thread (``hand``), which then
    calls ``close`` when it is done with it."""

    def __enter__(self: E) -> E:
        """The entry itself, for ``with`` blocks: a tier hands out its entries entered, and the drivers
        do not call this."""
        ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def enter(self, key: str | bytes, tid: int, blocking: bool) -> int:
        """Claim the key's call or join it: OWN, JOIN or ALONE. ``tid`` names the caller (a thread, a
        task); ``blocking`` callers wait in this thread (for cycle checks)."""
        ...

    def own(
        self, fn: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[T, bool]:
        """OWN: run fn here and finish the call with its outcome: (value, shared)."""
        ...

    def finish(self, value: object, error: BaseException | None) -> bool:
        """OWN: fn returned ``value`` or raised ``error``; hand the outcome to the waiters. Returns
        whether anyone shared it."""
        ...

    def wait(self, key: str | bytes, detached: Callable[[], bool] | None = None) -> Result[Any]:
        """JOIN: the call's outcome. ``detached`` is asked now and then: True leaves (Detached)."""
        ...

    def rename(self, tid: int) -> None:
        """OWN: fn runs in ``tid`` (a thread or task) from now on."""
        ...

    def note(self, data: bytes) -> None:
        """OWN: keep a wrapping tier's ``data`` with the call (at most TIER_CAP bytes)."""
        ...

    def recover(self, wait: bool = True) -> None:
        """End what the caller registered, as an exception leaving the block does (without waiting for
        a lock when ``wait`` is False: the rest is done in the background)."""
        ...

    def hand(self) -> None:
        """The block's end leaves the entry open: another thread goes on with it and closes it."""
        ...

    def close(self) -> None:
        """The entry is done with (idempotent): what it holds of the tier is let go."""
        ...


class Tier(Protocol):
    """Where callers of a key meet: ``caller`` makes the entry of one caller, not yet in any call, and
    keeps what it uses until the entry is closed (whoever makes one sees to it that it is); ``keep``
    makes a context manager that keeps what the tier's callers use (the table's mapping) while a call
    waits to be entered (do_future's queue). ``name`` names it in threads and messages."""

    name: str
    io: bool  # its entries' transitions do network I/O: do_async runs them off the loop

    def caller(self, deadline: float | None) -> Entry: ...

    def keep(self) -> AbstractContextManager[Any]: ...


class NextTier(Tier, Protocol):
    """A tier that can stand behind the table (``Stacked``): it also hears of the table's calls that
    carried its bytes when they are aborted or freed, in every process whose handle stacks it."""

    def on_event(self, event: str, key: str | bytes, data: bytes, reason: str) -> None:
        """``event`` is "abort" (``reason`` says why) or "free"; ``data`` is what the entry noted."""
        ...


_markers = itertools.count()  # not id(): an audited call, and every call makes two


class ShmCaller(Call):
    """The table's entry for one caller: the protocol's Call (its token too), entered as a block.

    enter, own, finish, wait, rename and note are the protocol's own transitions (mpflight._protocol).
    """

    __slots__ = ("at", "handed", "marker")

    at: Attachment
    handed: bool
    marker: int  # this caller's in the attachment's active set: it keeps the mapping, never this Call

    def __enter__(self) -> ShmCaller:
        return self  # inside the table since ShmTier.caller made it

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.handed:
            return
        try:
            if exc_type is not None:
                _protocol.recover(self, self.deadline)
        finally:
            self.close()

    def recover(self, wait: bool = True) -> None:
        _protocol.recover(self, self.deadline if wait else time.monotonic())

    def hand(self) -> None:
        self.handed = True

    def close(self) -> None:
        at = self.at  # Attachment.leave, inline: every call ends here
        active = at.active
        active.discard(self.marker)
        if not active and not at.refs:
            registry.close_unused(at)


class ShmTier:
    """The shared-memory table of one handle, as a tier."""

    def __init__(self, at: Attachment, opts: Options) -> None:
        self.at = at
        self.table = at.table
        self.opts = opts
        self.name = opts.name
        self.io = False

    def keep(self) -> Inside:
        return Inside(self.at)

    def caller(self, deadline: float | None) -> ShmCaller:
        """A caller inside the table: the mapping stays until the caller is closed. Nothing after the
        marker's add can let an exception out of here but the handler that takes the marker back (an
        interruption comes at a call's end or a function's entry, and the return has neither)."""
        c = ShmCaller()
        at = c.at = self.at
        c.t = self.table
        c.opts = self.opts
        c.deadline = deadline
        c.pending = c.handed = False  # seen and hit are set if it joins
        marker = c.marker = next(_markers)
        try:
            at.active.add(marker)
            if at.closed:
                raise ValueError(f"operation on closed mpflight.Group {self.name!r}")
        except BaseException:
            at.active.discard(marker)
            raise
        return c


class _Both:
    """Two keeps as one."""

    def __init__(self, first: AbstractContextManager[Any], second: AbstractContextManager[Any]) -> None:
        self.first, self.second = first, second

    def __enter__(self) -> _Both:
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)


class Stacked:
    """The table first, then ``next_tier``: the table's owner of a key is the next tier's caller."""

    def __init__(self, shm: ShmTier, next_tier: NextTier) -> None:
        self.shm = shm
        self.next = next_tier
        self.name = shm.name
        self.io = bool(getattr(next_tier, "io", True))
        hooks = shm.table.hooks
        if next_tier.on_event not in hooks:
            hooks.append(next_tier.on_event)

    def keep(self) -> _Both:
        return _Both(self.shm.keep(), self.next.keep())

    def close(self) -> None:
        """The handle is closed: its next tier hears no more of the table's events."""
        hooks = self.shm.table.hooks
        if self.next.on_event in hooks:
            hooks.remove(self.next.on_event)

    def caller(self, deadline: float | None) -> StackedCaller:
        local = self.shm.caller(deadline)
        try:
            return StackedCaller(local, self.next, deadline)
        except BaseException:
            local.close()
            raise


# What a relay that waited in the next tier publishes to the table's waiters when its own wait ends
# without the call's outcome: an abort, not fn's exception (fn raised nothing).
_NOT_AN_OUTCOME = (WaitTimeout, AbortError)


class StackedCaller:
    """A caller of a stacked tier: in the table always; in the next tier when it owns in the table.

    Owning in the table and waiting in the next tier, it relays: the next tier's outcome is published
    to the table's waiters. A relay whose caller detaches (a cancelled future) goes on relaying in a
    thread of its own, so that the table's other waiters still get the outcome.
    """

    def __init__(self, local: ShmCaller, next_tier: NextTier, deadline: float | None) -> None:
        self.local = local
        self.next_tier = next_tier
        self.deadline = deadline
        self.remote: Entry | None = None  # the next tier's entry, once this caller owns in the table
        self.remote_role = ALONE
        self.relay = False  # owns in the table, waits in the next tier: publishes what it gets
        self.handed = False
        self.relaying = False  # a detached caller's relay goes on in a thread of its own
        self.closed = False
        self.retakes = 0  # how many times this caller entered the next tier anew after its call aborted

    def __enter__(self) -> StackedCaller:
        return self  # inside the table since Stacked.caller made it

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.handed:
            return
        try:
            if exc_type is not None:
                self.recover()
        finally:
            self.close()

    def enter(self, key: str | bytes, tid: int, blocking: bool) -> int:
        role = self.local.enter(key, tid, blocking)
        if role != OWN:
            return role
        return self._enter_next(key, tid, blocking)

    def _enter_next(self, key: str | bytes, tid: int, blocking: bool = True) -> int:
        """This caller owns the table's call: enter the next tier for it. JOIN: it relays from now on;
        OWN: fn runs here, for the table's waiters (it owns there too, or the next tier has no room)."""
        if self.remote is not None:  # the entry of an earlier try (its call was aborted)
            remote, self.remote = self.remote, None
            remote.__exit__(None, None, None)
        remote = self.next_tier.caller(self.deadline).__enter__()
        self.remote = remote
        if hasattr(remote, "opts"):
            remote.opts = self.local.opts  # this caller's options (linger), not its handle's
        self.remote_role = role = remote.enter(key, tid, blocking)
        noted = getattr(remote, "noted", b"")  # the next tier's own state of the call, if it has some
        if noted:
            self.local.note(noted)
        if role == JOIN:
            # The table's call is now run by no thread of ours: the wait in the next tier. Naming it
            # after this entry keeps a later call of this thread (a pool thread, reused) from being
            # taken for its owner.
            self.local.rename(id(self))
            self.relay = True
            return JOIN
        self.relay = False
        return OWN

    def _take_over(self, key: str | bytes, detached: Callable[[], bool] | None) -> Result[Any]:
        """This caller now owns the table's call (it took it over, or the next tier's call it waited
        for was aborted and it may try again): enter the next tier anew for it. Relaying, it waits on;
        owning there, it runs fn (RunHere)."""
        if self._enter_next(key, threading.get_ident()) == JOIN:
            return self.wait(key, detached)
        raise RunHere(f"runs the call of key {key!r} again, for the hosts that waited on it")

    def own(
        self, fn: Callable[..., T], args: tuple[object, ...], kwargs: dict[str, object]
    ) -> tuple[T, bool]:
        """The one owner runner (fn here, then finish both tiers), fn wrapped as the next tier asks."""
        return _protocol.own(self, self.wrap(fn), args, kwargs)

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        """fn as the next tier wants it run when this caller owns there too (with its fence number)."""
        wrap = getattr(self.remote, "wrap", None) if self.remote_role == OWN else None
        return fn if wrap is None else wrap(fn)

    def finish(self, value: object, error: BaseException | None) -> bool:
        shared = False
        try:
            if self.remote is not None and self.remote_role == OWN:
                shared = self.remote.finish(value, error)
        finally:
            shared = self.local.finish(value, error) or shared
        return shared

    def wait(self, key: str | bytes, detached: Callable[[], bool] | None = None) -> Result[Any]:
        if not self.relay:
            try:
                return self.local.wait(key, detached)
            except RunHere:  # took over the table's call of an owner that is gone: it speaks for it now
                return self._take_over(key, detached)
        assert self.remote is not None
        try:
            result = self.remote.wait(key, detached)
        except AbortError as e:
            # The next tier's owner is gone: with takeover, this host tries again (one host wins the
            # next tier's call and runs fn, the others join it), within the caller's budget.
            if self.relaying or self.retakes >= self.local.opts.takeovers:
                self.local.abandon(f"{e.reason} (the next tier's call of the key)"[:200])
                raise
            self.retakes += 1
            log.info("mpflight group %r: the owner of key %r on another host is gone; entering anew",
                     self.local.opts.name, key)  # fmt: skip
            return self._take_over(key, detached)
        except RunHere:
            # The table's call is this caller's to run after all: it owns there, not in the next tier.
            self.relay, self.remote_role = False, ALONE
            raise
        except (_protocol.Detached, WaitTimeout):
            # This caller leaves (it detached, or its own deadline passed); the table's other waiters,
            # whose deadlines are theirs, still get the outcome: relay on for them.
            if not self.relaying:
                self._relay_alone(key)
                raise
            self.local.abandon("the wait in the next tier ended with its caller gone")
            raise
        except _NOT_AN_OUTCOME as e:
            self.local.abandon(f"the wait in the next tier ended: {type(e).__name__}: {e}"[:200])
            raise
        except Exception as e:
            self.local.finish(None, e)
            raise
        self.local.finish(result.value, None)
        return Result(result.value, True)

    def _relay_alone(self, key: str | bytes) -> None:
        """This caller left: relay on in a thread of its own, without the caller's deadline, which then
        closes the entry (recovery and closing leave the call to it).

        Whichever takes ``claim`` first decides: the thread relays, or (no thread could start, or an
        interruption came first) the caller's block ends the entry as any other's.
        """
        claim = threading.Lock()

        def relay() -> None:
            if not claim.acquire(blocking=False):
                return
            try:
                self.relay_to_table(key)
            finally:
                self.relaying = self.handed = False
                self.close()

        try:
            self.relaying = self.handed = True
            self.local.hand()
            if self.remote is not None and hasattr(self.remote, "deadline"):
                self.remote.deadline = None  # the next tier's own bounds (a lease) end the wait
            name = f"mpflight-relay-{self.local.opts.name}"
            start_thread(threading.Thread(target=relay, daemon=True, name=name))
        except BaseException:
            if claim.acquire(blocking=False):  # the thread never relays: the block's recovery ends it
                self.relaying = self.handed = self.local.handed = False
            raise

    def relay_to_table(self, key: str | bytes) -> None:
        try:
            self.wait(key)
        except RunHere:  # nobody here has fn to run: the table's waiters are told at once
            self.local.abandon("the next tier could not serve the call, and its caller had left")
        except BaseException:
            log.debug("mpflight: a detached relay of key %r ended without the outcome", key, exc_info=True)

    def rename(self, tid: int) -> None:
        self.local.rename(tid)
        if self.remote is not None:
            self.remote.rename(tid)

    def note(self, data: bytes) -> None:
        self.local.note(data)

    def recover(self, wait: bool = True) -> None:
        if self.relaying or (self.relay and not wait):
            # The relay thread ends the call with the next tier's outcome; a relay whose caller left
            # without waiting (a cancelled do_async) is a wait thread's, which sees it and relays on.
            return
        try:
            if self.remote is not None:
                self.remote.recover(wait)
        finally:
            self.local.recover(wait)

    def hand(self) -> None:
        self.handed = True
        self.local.hand()

    def close(self) -> None:
        if self.closed or self.relaying:
            return  # a relay thread closes the entry when it is done
        self.closed = True
        try:
            if self.remote is not None:
                self.remote.__exit__(None, None, None)
        finally:
            self.local.close()
