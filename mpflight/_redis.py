"""The cross-host tier: one execution per key for a fleet of hosts, on Redis, behind each host's table.

Only the table's owner of a key on a host talks to Redis for it (mpflight._tier.Stacked). In Redis,
one call of a key is a **lease** (a hash with the owner's random token, its fence number, host and pid,
and one field per remote waiter), renewed by the owner's process at a third of its length; its
outcome goes to a **stream** named after the token, which is read from ID 0, so a waiter that comes
after the publish still finds it. Every write is one Lua script that checks the token first:

    ENTER    no lease: take it (fence = INCR of the key's fence counter) -> OWN
             a lease: add this waiter's field -> JOIN (the owner's token, fence, host, pid, ttl)
    FINISH   the lease is the owner's: count the waiters, delete it, and if any joined, XADD the
             outcome to the token's stream (which expires) -> waiters; not the owner's -> FENCED
    RENEW    the lease is the owner's: extend it
    LIVE     how long the owner's lease has left (a waiter asks when its read times out)
    FORGET   rename the lease away: new callers start a new call; the old one still publishes

A waiter whose owner's lease expires (its host died or lost Redis) gets AbortError. A dead owner on a
host that lives is seen by the table (mpflight._protocol), whose abort hook (``on_event``) runs the
FINISH script with an abort for the owner's token. Keys of one call share one hash tag (Redis Cluster).
Nothing read from Redis is trusted: fields are type- and size-checked, payloads go through the table's
codec, and with ``secret`` every outcome carries an HMAC that readers check.

Redis trouble (down, slow, out of memory, refusing) never holds a caller past its deadline: with
``fail="open"`` the caller coalesces on its host alone (counted, logged once per episode), with
``fail="closed"`` it raises TierUnavailable. Client retries are off: a timed-out write is not resent.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import inspect
import logging
import math
import os
import secrets
import struct
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from . import _codec, _faults, _protocol
from ._errors import AbortError, CorruptPayload, MPFlightError, TierUnavailable, WaitTimeout, start_thread
from ._layout import TIER_CAP
from ._protocol import ALONE, JOIN, MAX_RESULT_BYTES, OWN, Detached, Options, Result, RunHere, key_identity
from ._registry import seconds

log = logging.getLogger("mpflight")

DEFAULT_LEASE: Final = 5.0  # seconds; renewed every third of it
DEFAULT_FENCE_TTL: Final = 24 * 3600.0
DEFAULT_MAX_REMOTE_BYTES: Final = 16 * 1024 * 1024
DEFAULT_REDIS_TIMEOUT: Final = 1.0  # socket timeout of one non-blocking command, and of connecting
# How long a finished call's outcome stays readable for the waiters that joined it.
OUTCOME_TTL: Final = 30.0
# The longest single blocking read: a waiter looks at its caller's state (cancelled?) this often.
MAX_BLOCK: Final = 1.0
# What a blocking read's socket timeout adds to its block time; and what a waiter allows past the
# owner's lease before it asks Redis whether the lease is still there.
READ_MARGIN: Final = 0.25
# A reader with nothing to read for this long ends; the next wait starts one again.
READER_IDLE: Final = 5.0
# How many scripts (lease renewals, lease checks) go to Redis in one round trip.
BATCH: Final = 500
# The connections of one process's client made from a URL.
MAX_CONNECTIONS: Final = 16
# How many ended calls a process remembers, so that the table's free of one it ended tells Redis nothing.
ENDED_KEPT: Final = 4096
LEASE_GRACE: Final = 0.05
_FENCING: Final = "fencing" not in _faults.DISABLED  # the test switch (mpflight._faults)

# The outcome kinds of a stream entry: a tier-1 payload (value, error, abort), or "not shared" (too
# large for Redis: every host runs fn itself).
_PAYLOAD, _NOT_SHARED = b"p", b"n"

# KEYS: lease, fence, last; ARGV: token, host, pid, lease ms, fence ttl ms, identity, the streams' prefix
_ENTER: Final = """
local t = redis.call('HGET', KEYS[1], 't')
if not t then
  local lt, lf, lh, lp, lk = unpack(redis.call('HMGET', KEYS[3], 't', 'f', 'h', 'p', 'k'))
  if lt and lk == ARGV[6] and redis.call('EXISTS', ARGV[7] .. lt) == 1 then  -- a lingering outcome
    return {4, lt, lf, lh, lp, redis.call('PTTL', KEYS[3])}
  end
  local f = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('HSET', KEYS[1], 't', ARGV[1], 'f', f, 'h', ARGV[2], 'p', ARGV[3], 'k', ARGV[6])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {1, ARGV[1], f, ARGV[2], ARGV[3], tonumber(ARGV[4])}
end
local f, h, p, k = unpack(redis.call('HMGET', KEYS[1], 'f', 'h', 'p', 'k'))
if k ~= ARGV[6] then return {3} end
if t == ARGV[1] then return {1, t, f, h, p, redis.call('PTTL', KEYS[1])} end  -- this very ENTER, again
redis.call('HSET', KEYS[1], 'w:' .. ARGV[1], 1)
return {2, t, f, h, p, redis.call('PTTL', KEYS[1])}
"""

# KEYS: lease, forgotten lease, stream, last; ARGV: token, kind, payload, ttl ms, fence, host, pid, sig,
# fencing (1), the streams' prefix, linger ms (0: the outcome does not linger)
_FINISH: Final = """
local lease, stream = KEYS[1], KEYS[3]
if ARGV[9] == '0' then  -- the test switch "fencing" off: publish to whichever call is current
  local current = redis.call('HGET', lease, 't')
  if current then stream = ARGV[10] .. current else lease = KEYS[2] end
elseif redis.call('HGET', lease, 't') ~= ARGV[1] then
  lease = KEYS[2]
  if redis.call('HGET', lease, 't') ~= ARGV[1] then return -1 end
end
local joins = redis.call('HLEN', lease) - 5  -- t, f, h, p, k; every other field is a waiter's
local k = redis.call('HGET', lease, 'k')
redis.call('DEL', lease)
local linger = tonumber(ARGV[11])
if joins > 0 or linger > 0 then
  redis.call('XADD', stream, '*', 'o', ARGV[2], 'p', ARGV[3], 'f', ARGV[5], 'h', ARGV[6],
             'i', ARGV[7], 's', ARGV[8])
  redis.call('PEXPIRE', stream, math.max(tonumber(ARGV[4]), linger))
end
if linger > 0 and lease == KEYS[1] then  -- from now: callers that come within linger read it
  redis.call('DEL', KEYS[4])
  redis.call('HSET', KEYS[4], 't', ARGV[1], 'f', ARGV[5], 'h', ARGV[6], 'p', ARGV[7], 'k', k)
  redis.call('PEXPIRE', KEYS[4], linger)
end
return joins
"""

# KEYS: lease, forgotten lease; ARGV: token, lease ms
_RENEW: Final = """
for _, lease in ipairs(KEYS) do
  if redis.call('HGET', lease, 't') == ARGV[1] then
    redis.call('PEXPIRE', lease, ARGV[2])
    return 1
  end
end
return 0
"""

# KEYS: lease, forgotten lease; ARGV: token -> ms left, or -2 when the owner holds no lease
_LIVE: Final = """
for _, lease in ipairs(KEYS) do
  if redis.call('HGET', lease, 't') == ARGV[1] then return redis.call('PTTL', lease) end
end
return -2
"""

# KEYS: lease, last; ARGV: the call's key prefix. The forgotten lease keeps its ttl; a linger ends.
_FORGET: Final = """
redis.call('DEL', KEYS[2])
local t = redis.call('HGET', KEYS[1], 't')
if t then redis.call('RENAME', KEYS[1], ARGV[1] .. 'gone:' .. t) end
return t and 1 or 0
"""

# The tier's own bytes in the table's slot (at most TIER_CAP): what inflight() and the CLI show, and
# what the abort hook needs to publish an abort for a dead owner's call.
_NOTE: Final = struct.Struct("<cc16sQ16s")  # "R", role, token, fence, the key's hash tag; then the host
_NOTE_OWN, _NOTE_WAIT = b"O", b"W"
_HOST_CAP: Final = TIER_CAP - _NOTE.size
assert _NOTE.size + 8 <= TIER_CAP  # room for a host's name of 8 bytes at least

# fn's fence number, while fn runs as the fleet's owner of its call (mpflight.fence()).
_fence: contextvars.ContextVar[int | None] = contextvars.ContextVar("mpflight_fence", default=None)


def fence() -> int | None:
    """The fence number of the cross-host call that fn runs for, or None (no cross-host tier, or fn
    runs without it). It grows with every call of a key while the key's counter lives; compare it
    with the number your own side effects last saw to reject a late owner's writes."""
    return _fence.get()


def parse_note(data: bytes) -> dict[str, object] | None:
    """What this tier keeps in a slot, for inflight() and the CLI: role, fence and the owner's host."""
    if len(data) < _NOTE.size or data[:1] != b"R":
        return None
    _, role, _, fence_no, _ = _NOTE.unpack_from(data)
    host = data[_NOTE.size :].decode("utf-8", "replace")
    return {"tier": "redis", "role": "owner" if role == _NOTE_OWN else "waiter", "fence": fence_no,
            "owner_host": host}  # fmt: skip


class _Trouble(Exception):
    """Redis could not be used for this step (its error, or ours reading its reply)."""


class RedisTier:
    """The next tier behind a host's table (mpflight._tier.NextTier), for one group."""

    io = True

    def __init__(
        self, client: object, opts: Options, *, host: str, namespace: str, lease: float, renew: float,
        fail: str, max_remote_bytes: int, fence_ttl: float, secret: bytes | None, timeout: float,
        count: Callable[[str], None],
    ) -> None:  # fmt: skip
        try:
            import redis  # the optional extra: imported only when the tier is on
        except ImportError:
            raise ImportError("redis= needs redis-py: pip install 'mpflight[redis]'") from None

        self._redis = redis
        # Everything a step against Redis may raise that means "Redis could not serve it".
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError, redis.exceptions.RedisClusterException, OSError,
        )  # fmt: skip
        self._failures: tuple[type[BaseException], ...] = (*self._errors, _Trouble)  # ours too
        self.name = opts.name
        self.opts = opts
        self.host = host
        self.lease, self.renew_every, self.fail = lease, renew, fail
        self.max_remote_bytes, self.fence_ttl, self.secret, self.timeout = (
            max_remote_bytes, fence_ttl, secret, timeout,
        )  # fmt: skip
        self.count = count
        self.prefix = f"{namespace}mpf:{opts.name}:"
        self._url = client if isinstance(client, str) else None
        self._given = None if isinstance(client, str) else client
        self._pid = os.getpid()
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._troubled = False  # in an episode of Redis trouble: logged once, at its start
        self._checked_policy = False
        self._owned: dict[str, RedisEntry] = {}  # token -> entry: the leases this process renews
        self._ended: dict[str, bool] = {}  # tokens whose end this process published, oldest first
        self._reader: _Reader | None = None
        self.closed = False
        self._reader_pid = 0
        self._renewer: threading.Thread | None = None
        self._wake = threading.Event()
        _tiers.add(self)

    # -- the client ----------------------------------------------------------------------------------

    @property
    def reader(self) -> _Reader | None:
        """This process's reader of outcome streams; None for a Redis Cluster."""
        client = self.client()
        if hasattr(client, "get_node_from_key"):
            return None
        with self._lock:
            if self._reader is None or self._reader_pid != os.getpid():
                self._reader, self._reader_pid = _Reader(self), os.getpid()
            return self._reader

    def client(self) -> Any:
        """This process's client: built from the URL in each process; a given client only in the
        process that gave it (its connections are not the child's to use)."""
        if self._client is not None and self._pid == os.getpid():
            return self._client
        if self.closed:
            raise _Trouble(f"the handle of group {self.name!r} was closed")
        with self._lock:
            if self._pid != os.getpid():
                if self._given is not None:
                    raise MPFlightError(
                        f"mpflight group {self.name!r}: the redis client was made in process {self._pid} "
                        "and cannot be used after fork; pass redis= a URL (a client is made per process)"
                    )
                self._pid, self._client, self._scripts = os.getpid(), None, {}
                self._owned, self._renewer = {}, None
            if self._client is None:
                self._client = self._given if self._given is not None else self._from_url(self._url or "")
                self._scripts = {
                    name: self._client.register_script(text)
                    for name, text in (("enter", _ENTER), ("finish", _FINISH), ("renew", _RENEW),
                                       ("live", _LIVE), ("forget", _FORGET))
                }  # fmt: skip
            return self._client

    def close(self) -> None:
        """Close this process's client, when the tier made it (a given client is its owner's); its
        threads end."""
        with self._lock:
            self.closed = True
            client, self._client = self._client, None
        self._wake.set()
        if client is not None and self._given is None and self._pid == os.getpid():
            client.close()
            # A client made on a pool it was given does not close the pool: its sockets go here.
            client.connection_pool.disconnect()

    def _from_url(self, url: str) -> Any:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # A bounded pool: threads beyond it wait for a connection (as long as a command may take)
        # instead of opening more; the reader holds one of its own.
        pool = self._redis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=self.timeout, socket_timeout=self.timeout,
            socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0), health_check_interval=0,
        )  # fmt: skip
        return self._redis.Redis(connection_pool=pool)

    def run(self, script: str, keys: list[str], args: list[object]) -> Any:
        """Run one of the scripts; Redis trouble of any kind is _Trouble."""
        try:
            client = self.client()
            if not self._checked_policy:
                self._check_policy(client)
            reply = self._scripts[script](keys=keys, args=args, client=client)
        except (self._redis.exceptions.NoPermissionError, self._redis.exceptions.AuthenticationError) as e:
            # Not trouble but configuration: the user or its rights are wrong, whatever fail says.
            raise TierUnavailable(self.name, f"{type(e).__name__}: {e}") from e
        except self._errors as e:
            raise _Trouble(f"{type(e).__name__}: {e}") from e
        self._recovered()
        return reply

    def _check_policy(self, client: Any) -> None:
        """Warn once when Redis may evict a lease to make room (an allkeys-* policy)."""
        self._checked_policy = True
        try:
            reply = client.config_get("maxmemory-policy")
        except self._errors:
            return  # CONFIG may be refused to this user: nothing to say
        policy = (
            reply.get("maxmemory-policy", reply.get(b"maxmemory-policy")) if isinstance(reply, dict) else None
        )
        if isinstance(policy, bytes):
            policy = policy.decode("utf-8", "replace")
        if isinstance(policy, str) and policy.startswith("allkeys-"):
            log.warning("mpflight group %r: Redis's maxmemory-policy is %s, which can evict a call's "
                        "lease: its waiters then get AbortError", self.name, policy)  # fmt: skip

    def trouble(self, what: str, error: BaseException) -> None:
        """Redis could not serve a step: raise (fail="closed") or note the fallback (fail="open")."""
        if self.fail == "closed":
            raise TierUnavailable(self.name, f"{what}: {error}") from error
        self.count("remote_fallbacks")
        if not self._troubled:
            self._troubled = True
            log.warning("mpflight group %r: Redis unavailable (%s: %s): coalescing on this host only "
                        "until it answers again", self.name, what, error)  # fmt: skip

    def _recovered(self) -> None:
        if self._troubled:
            self._troubled = False
            log.warning("mpflight group %r: Redis answers again: coalescing across hosts", self.name)

    # -- keys ------------------------------------------------------------------------------------------

    def keys_of(self, key: str | bytes) -> tuple[str, bytes]:
        """The call's key prefix (one hash tag per key) and the key's full identity."""
        kind, raw, _ = key_identity(key)
        identity = bytes([kind]) + raw
        tag = hashlib.blake2b(identity, digest_size=16).hexdigest()
        return f"{self.prefix}{{{tag}}}:", identity

    # -- the seam --------------------------------------------------------------------------------------

    def caller(self, deadline: float | None) -> RedisEntry:
        return RedisEntry(self, deadline)

    def keep(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def on_event(self, event: str, key: str | bytes, data: bytes, reason: str) -> None:
        """The table aborted or freed a call that carried this tier's note: when its local owner owned
        the call in Redis too, publish an abort there for its waiters on other hosts."""
        if len(data) < _NOTE.size or data[:1] != b"R" or data[1:2] != _NOTE_OWN:
            return
        _, _, token_bytes, fence_no, tag = _NOTE.unpack_from(data)
        token = token_bytes.hex()
        with self._lock:
            self._owned.pop(token, None)
            if self._ended.pop(token, False):
                return  # this process published the call's end itself: the table freeing it is its due
        # The note's hash tag, not the key: the table keeps only the first bytes of a long key.
        prefix = f"{self.prefix}{{{tag.hex()}}}:"
        why = reason or "the owner's call ended without an outcome"
        abort = _codec.pack_abort(f"{why} (host {self.host})")
        try:  # in the hook's thread, bounded by redis_timeout: a queue could die with its process
            self.publish(prefix, token, fence_no, _PAYLOAD, abort)
        except (_Trouble, TierUnavailable) as e:
            log.warning("mpflight group %r: could not publish an abort to Redis (%s): remote waiters "
                        "see the lease expire", self.name, e)  # fmt: skip

    def forget(self, key: str | bytes) -> None:
        prefix, _ = self.keys_of(key)
        try:
            self.run("forget", [prefix + "lease", prefix + "last"], [prefix])
        except _Trouble as e:
            self.trouble("forget", e)

    # -- publishing and renewing -------------------------------------------------------------------------

    def publish(
        self, prefix: str, token: str, fence_no: int, kind: bytes, payload: bytes, linger: float = 0.0
    ) -> int:
        """FINISH for ``token`` (of the call's key ``prefix``): the number of remote waiters, or -1 when
        the lease is not the token's. ``linger``: seconds the outcome stays for callers that come after."""
        sig = self._sign(prefix, token, fence_no, kind, payload)
        keys = [prefix + "lease", prefix + "gone:" + token, prefix + "out:" + token, prefix + "last"]
        ttl = int(OUTCOME_TTL * 1000)
        fencing, pid = int(_FENCING), os.getpid()
        args = [token, kind, payload, ttl, fence_no, self.host, pid, sig, fencing, prefix + "out:",
                math.ceil(linger * 1000)]  # fmt: skip
        reply = self.run("finish", keys, args)
        if type(reply) is not int:
            raise _Trouble(f"FINISH replied {type(reply).__name__}, not an integer")
        return reply

    def _sign(self, prefix: str, token: str, fence_no: int, kind: bytes, payload: bytes) -> bytes:
        """The outcome's HMAC: it binds the key and group (the prefix), the call (token, fence) and
        the outcome, so that a signed outcome cannot be replayed for another key or call."""
        if self.secret is None:
            return b""
        head = f"{prefix}\0{token}\0{fence_no}\0".encode()
        return hmac.new(self.secret, head + kind + payload, hashlib.sha256).digest()

    def hold(self, entry: RedisEntry) -> None:
        """Renew the entry's lease every third of it until it is let go. The renewer thread starts
        on first use (not in Group(): gunicorn --preload forks after import) and lives on."""
        with self._lock:
            entry.renew_at = time.monotonic() + self.renew_every
            self._owned[entry.token] = entry
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(
                    target=_renew_loop, args=(weakref.ref(self),), daemon=True,
                    name=f"mpflight-renew-{self.name}",
                )  # fmt: skip
                start_thread(self._renewer)

    def let_go(self, entry: RedisEntry, ended: bool = False) -> None:
        """Stop renewing the entry's lease; ``ended``: its end is published (or is being)."""
        with self._lock:
            self._owned.pop(entry.token, None)
            if ended:
                self._ended[entry.token] = True
                while len(self._ended) > ENDED_KEPT:  # a table freed elsewhere tells another process
                    del self._ended[next(iter(self._ended))]

    def renew_due(self) -> float:
        """Renew the leases that are due; return when the next one is."""
        now = time.monotonic()
        with self._lock:
            due = [e for e in self._owned.values() if e.renew_at <= now]
            for entry in due:
                entry.renew_at = now + self.renew_every
        for start in range(0, len(due), BATCH):  # one round trip per batch, not per lease
            batch = due[start : start + BATCH]
            try:
                pipe = self.client().pipeline(transaction=False)  # _Trouble once closed
                for entry in batch:
                    keys = [entry.prefix + "lease", entry.prefix + "gone:" + entry.token]
                    self._scripts["renew"](keys=keys, args=[entry.token, int(self.lease * 1000)], client=pipe)
                kept = pipe.execute(raise_on_error=False)
            except self._failures as e:
                log.debug("mpflight group %r: lease renewals failed: %s", self.name, e)
                continue
            for entry, answer in zip(batch, kept, strict=False):
                if answer == 0:
                    self.let_go(entry)  # expired or taken: its publish will be fenced
        with self._lock:
            return min((e.renew_at for e in self._owned.values()), default=now + self.renew_every)


def redis_tier(
    redis: object, opts: Options, *, host: str, namespace: str, lease: float, fail: str,
    max_remote_bytes: int, fence_ttl: float, secret: bytes | str | None, timeout: float,
    count: Callable[[str], None],
) -> RedisTier:  # fmt: skip
    """The tier of ``Group(redis=...)``, its options checked: a URL or a redis-py client, and the rest."""
    if not isinstance(redis, str) and not callable(getattr(redis, "register_script", None)):
        raise TypeError(f"redis must be a URL or a redis-py client, not {type(redis).__name__}")
    if isinstance(redis, str) and not redis.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis must be a redis://, rediss:// or unix:// URL, not {redis!r}")
    lease = seconds("lease", lease)
    if fail not in ("open", "closed"):
        raise ValueError(f'fail must be "open" or "closed", not {fail!r}')
    if type(max_remote_bytes) is not int or not 0 <= max_remote_bytes <= MAX_RESULT_BYTES:
        raise ValueError(f"max_remote_bytes must be an int from 0 to {MAX_RESULT_BYTES}")
    if not isinstance(namespace, str) or any(c in namespace for c in "{}") or len(namespace) > 64:
        raise ValueError(
            f"namespace must be a string of at most 64 characters without braces, not {namespace!r}"
        )
    if secret is not None and not isinstance(secret, bytes | str):
        raise TypeError(f"secret must be bytes or str, not {type(secret).__name__}")
    return RedisTier(
        redis, opts, host=host, namespace=namespace, lease=lease, renew=lease / 3, fail=fail,
        max_remote_bytes=max_remote_bytes, fence_ttl=seconds("fence_ttl", fence_ttl),
        secret=secret.encode() if isinstance(secret, str) else secret,
        timeout=seconds("redis_timeout", timeout), count=count,
    )  # fmt: skip


_tiers: weakref.WeakSet[RedisTier] = weakref.WeakSet()


def _renew_loop(ref: weakref.ref[RedisTier]) -> None:
    """The renewer of one tier in one process: renews each owned lease a third of it after the last
    time; ends with the tier."""
    while True:
        tier = ref()
        if tier is None or tier.closed:
            return
        wake, then = tier._wake, tier.renew_due()
        del tier  # holding no reference while it sleeps: the tier may go
        wake.wait(max(then - time.monotonic(), 0.001))
        wake.clear()


class _Wait:
    """One waiter's registration with the reader: set when its stream has an entry or the read failed."""

    __slots__ = ("entry", "error", "event", "expired", "leases", "token", "ttl")

    def __init__(self, leases: list[str], token: str, ttl: float) -> None:
        self.event = threading.Event()
        self.entry: dict[bytes, bytes] | None = None
        self.error: _Trouble | None = None
        self.expired = False  # the owner's lease went with no outcome
        self.leases, self.token, self.ttl = leases, token, ttl  # ttl: when the lease would expire


class _Reader:
    """This process's one blocking read of every outcome stream it waits on (a standalone Redis).

    A waiter registers its stream and sleeps on an event. The reader's XREAD covers every registered
    stream from its start, and a control stream of its own: a registration that the read in progress
    does not cover adds an entry there, which ends that read so that the next one takes it in. So a
    process holds one connection for its waits, however many keys it waits on.
    """

    def __init__(self, tier: RedisTier) -> None:
        self.tier = tier
        self.lock = threading.Lock()
        self.arrived = threading.Condition(self.lock)
        self.waits: dict[str, list[_Wait]] = {}
        self.reading: set[str] = set()  # the streams the read in progress covers
        self.poked = False  # a registration has ended the read in progress (its next one covers it)
        self.control = f"{tier.prefix}{{reader-{secrets.token_hex(8)}}}:control"
        self.control_id = b"0-0"
        self.thread: threading.Thread | None = None

    def register(self, stream: str, leases: list[str], token: str, ttl: float) -> _Wait:
        """Have ``stream``'s first entry read for the caller, and the owner's lease watched from its
        expiry (``ttl``, monotonic) on; the caller waits on the registration's event (and ends it
        with ``unregister``). _Trouble."""
        w = _Wait(leases, token, ttl)
        with self.lock:
            self.waits.setdefault(stream, []).append(w)
            started = self.thread is None
            if started:
                thread = self.thread = threading.Thread(
                    target=self._loop, daemon=True, name=f"mpflight-read-{self.tier.name}"
                )
                try:
                    start_thread(thread)
                except BaseException:  # no thread (none can start now), or an interruption as it started
                    self.waits[stream].remove(w)  # this caller does not wait
                    if not self.waits[stream]:
                        del self.waits[stream]
                    if not thread.is_alive():
                        self.thread = None  # the next registration starts a reader (two, at worst, run)
                    raise
            # One poke ends a read: those who register while one is under way are in the next read.
            poke = not started and stream not in self.reading and not self.poked
            self.poked = self.poked or poke
            self.arrived.notify()
        if poke:
            try:
                self._poke()
            except _Trouble:
                self.unregister(stream, w)
                raise
        return w

    def unregister(self, stream: str, w: _Wait) -> None:
        with self.lock:
            waits = self.waits.get(stream)
            if waits is not None and w in waits:
                waits.remove(w)
                if not waits:
                    del self.waits[stream]

    def _poke(self) -> None:
        tier = self.tier
        try:
            pipe = tier.client().pipeline(transaction=False)
            pipe.xadd(self.control, {"n": "1"}, maxlen=16, approximate=True)
            pipe.pexpire(self.control, int(OUTCOME_TTL * 1000))
            pipe.execute()
        except tier._errors as e:
            raise _Trouble(f"{type(e).__name__}: {e}") from e

    def _loop(self) -> None:
        tier, conn, pool = self.tier, None, None
        failures = tier._failures
        try:
            while True:
                with self.lock:
                    while not self.waits:
                        self.reading = set()
                        if not self.arrived.wait(READER_IDLE) and not self.waits:
                            self.thread = None  # idle: decided under the lock a registration takes
                            return
                    streams = list(self.waits)
                    self.reading, self.poked = set(streams), False
                try:
                    if conn is None:
                        pool = tier.client().connection_pool
                        conn = pool.get_connection()
                    ids = [self.control_id, *[b"0-0"] * len(streams)]
                    block = max(int(min(MAX_BLOCK, self._next_expiry() - time.monotonic()) * 1000), 1)
                    conn.send_command(
                        "XREAD", "COUNT", 1, "BLOCK", block, "STREAMS", self.control, *streams, *ids
                    )
                    found = _stream_entries(conn.read_response(timeout=MAX_BLOCK + READ_MARGIN))
                except failures as e:
                    if conn is not None and pool is not None:
                        conn.disconnect()
                        pool.release(conn)
                    conn = None
                    trouble = e if isinstance(e, _Trouble) else _Trouble(f"{type(e).__name__}: {e}")
                    self._deliver(streams, None, trouble)
                    continue
                for name, entry_id, fields in found:
                    if name == self.control.encode():
                        self.control_id = entry_id
                    else:
                        self._deliver([name.decode()], fields, None)
                self._check_leases()
        except BaseException as e:  # not Redis's trouble but ours: nobody may be left waiting on it
            log.exception("mpflight group %r: the reader of outcome streams failed", tier.name)
            with self.lock:
                self.thread = None
            self._deliver(list(self.waits), None, _Trouble(f"the reader failed: {type(e).__name__}: {e}"))
            raise
        finally:
            with self.lock:
                if self.thread is threading.current_thread():
                    self.thread = None
                self.reading = set()
            if conn is not None and pool is not None:
                pool.release(conn)

    def _deliver(
        self,
        streams: list[str],
        fields: dict[bytes, bytes] | None,
        error: _Trouble | None,
        expired: bool = False,
    ) -> None:
        with self.lock:
            for stream in streams:
                for w in self.waits.pop(stream, []):
                    w.entry, w.error, w.expired = fields, error, expired
                    w.event.set()

    def _next_expiry(self) -> float:
        with self.lock:
            ttls = [ws[0].ttl for ws in self.waits.values() if ws]
        return min(ttls, default=math.inf) + LEASE_GRACE

    def _check_leases(self) -> None:
        """Ask Redis about the leases whose expiry has come (LIVE), in batches of one round trip:
        a renewed one is watched on, a gone one ends its waits (an abort, unless the outcome came)."""
        now = time.monotonic()
        with self.lock:
            due = [(stream, ws[0]) for stream, ws in self.waits.items() if ws and ws[0].ttl <= now]
        tier = self.tier
        for start in range(0, len(due), BATCH):
            batch = due[start : start + BATCH]
            try:
                pipe = tier.client().pipeline(transaction=False)
                for _, w in batch:
                    tier._scripts["live"](keys=w.leases, args=[w.token], client=pipe)
                answers = pipe.execute(raise_on_error=False)
            except tier._failures as e:
                self._deliver([stream for stream, _ in batch], None, _Trouble(f"{type(e).__name__}: {e}"))
                continue
            for (stream, _), left in zip(batch, answers, strict=False):
                if left == -2:
                    self._deliver([stream], None, None, expired=True)
                elif type(left) is int:
                    ttl = time.monotonic() + (left if left >= 0 else tier.lease * 1000) / 1000
                    with self.lock:
                        for w in self.waits.get(stream, []):
                            w.ttl = ttl
                else:
                    self._deliver([stream], None, _Trouble(f"LIVE replied {left!r}"))


class RedisEntry:
    """One table owner's part in the fleet's call of a key (mpflight._tier.Entry)."""

    def __init__(self, tier: RedisTier, deadline: float | None) -> None:
        self.tier = tier
        self.deadline = deadline
        self.role = ALONE  # OWN, JOIN; ALONE when Redis takes no part (trouble, a digest collision)
        self.key: str | bytes = ""
        self.prefix = ""
        self.token = ""  # the owner's
        self.fence = 0
        self.owner_host = ""
        self.owner_pid = 0
        self.ttl = 0.0  # when the owner's lease expires, monotonic
        self.renew_at = 0.0  # OWN: when its lease is renewed next, monotonic
        self.noted = b""
        self.done = False
        self.opts = tier.opts  # the caller's options (linger), set by the stacked caller

    def __enter__(self) -> RedisEntry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is not None:
                self.recover()
        finally:
            self.close()

    def enter(self, key: str | bytes, tid: int, blocking: bool) -> int:
        tier = self.tier
        self.key = key
        self.prefix, identity = tier.keys_of(key)
        token = secrets.token_hex(16)
        try:
            reply = tier.run(
                "enter", [self.prefix + "lease", self.prefix + "fence", self.prefix + "last"],
                [token, tier.host, os.getpid(), int(tier.lease * 1000), int(tier.fence_ttl * 1000), identity,
                 self.prefix + "out:"],
            )  # fmt: skip
            role, fields = _entered(reply)
        except _Trouble as e:
            tier.trouble("enter", e)
            return OWN  # the table's owner runs fn for this host
        if role == 3:
            return OWN  # another key has the same digest in Redis: this host runs its own call
        owner_token, self.fence, self.owner_host, self.owner_pid, ttl = fields
        self.token, self.ttl = owner_token, time.monotonic() + ttl / 1000
        host = self.owner_host.encode("utf-8", "replace")[:_HOST_CAP]
        tag = bytes.fromhex(self.prefix[self.prefix.rindex("{") + 1 : self.prefix.rindex("}")])
        if role == 1:
            self.role = OWN
            tier.count("remote_owners")
            tier.hold(self)
            self.noted = _NOTE.pack(b"R", _NOTE_OWN, bytes.fromhex(token), self.fence, tag) + host
            return OWN
        self.role = JOIN  # a running call's (2), or a lingering outcome's (4): its stream holds it
        tier.count("remote_joins")
        self.noted = _NOTE.pack(b"R", _NOTE_WAIT, bytes.fromhex(owner_token), self.fence, tag) + host
        return JOIN

    own = _protocol.own  # the one owner runner (drivers use the stacked caller's)

    def finish(self, value: object, error: BaseException | None) -> bool:
        """OWN: publish fn's outcome for the remote waiters; whether any joined."""
        if self.role != OWN or self.done:
            return False
        self.done = True
        tier = self.tier
        tier.let_go(self, ended=True)
        opts = self.opts
        payload = _protocol.encode_outcome(
            value, error, opts.codec, opts.max_result_bytes, self.key, opts.name
        )
        kind = _PAYLOAD
        if len(payload) > tier.max_remote_bytes:
            tier.count("remote_not_shared")
            kind, payload = _NOT_SHARED, b""
        opts = self.opts
        lingers = (
            kind == _PAYLOAD
            and _codec.is_fns(payload)  # not an error saying the value could not be carried
            and (error is None or (opts.linger_errors and isinstance(error, Exception)))
        )
        try:
            joins = tier.publish(
                self.prefix, self.token, self.fence, kind, payload, opts.linger if lingers else 0.0
            )
        except (_Trouble, TierUnavailable) as e:  # the owner has its outcome whatever fail says
            tier.count("remote_fallbacks")
            log.warning("mpflight group %r: could not publish to Redis (%s): remote waiters see the "
                        "lease expire", tier.name, e)  # fmt: skip
            return False
        if joins < 0:
            tier.count("remote_fenced")
            log.warning("mpflight group %r: the lease of key %r was lost before fn returned (a pause past "
                        "the lease?): its outcome was not published", tier.name, self.key)  # fmt: skip
            return False
        return joins > 0 and kind == _PAYLOAD  # the waiters of a not-shared outcome run fn themselves

    def wait(self, key: str | bytes, detached: Callable[[], bool] | None = None) -> Result[Any]:
        """JOIN: the remote owner's outcome; AbortError when its lease expires first."""
        tier = self.tier
        stream = self.prefix + "out:" + self.token
        began = time.monotonic()
        reader = registered = None
        try:
            try:
                reader = tier.reader  # one read for every wait of this process; None in a Cluster
                if reader is not None:
                    leases = [self.prefix + "lease", self.prefix + "gone:" + self.token]
                    registered = reader.register(stream, leases, self.token, self.ttl)
                while True:
                    entry = self._next(key, stream, registered, detached)
                    if entry is not None:
                        return self._outcome(key, entry, time.monotonic() - began)
            except _Trouble as e:
                tier.trouble("wait", e)
                raise RunHere from e
        finally:
            if reader is not None and registered is not None:
                reader.unregister(stream, registered)

    def _next(
        self, key: str | bytes, stream: str, registered: _Wait | None, detached: Callable[[], bool] | None
    ) -> dict[bytes, bytes] | None:
        """One step of a wait: the outcome's entry if it came, else None (the lease still holds)."""
        tier = self.tier
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise WaitTimeout(
                f"gave up waiting {tier.opts.timeout} s for key {key!r} (owner on host {self.owner_host})",
                key, tier.opts.timeout,
            )  # fmt: skip
        if detached is not None and detached():
            raise Detached
        if registered is not None:  # the reader reads and watches the lease: wake for the caller only
            until = now + MAX_BLOCK if detached is not None else math.inf
            if self.deadline is not None:
                until = min(until, self.deadline)
            registered.event.wait(None if until == math.inf else max(until - now, 0.001))
            if registered.error is not None:
                raise registered.error
            if not registered.expired:
                return registered.entry
            entry = self._read(stream, 0)  # published as the lease went: it is there
            if entry is None:
                why = f"the owner's lease on host {self.owner_host} expired"
                raise AbortError(key, self.owner_pid, why)
            return entry
        until = min(self.ttl + LEASE_GRACE, now + MAX_BLOCK)
        if self.deadline is not None:
            until = min(until, self.deadline)
        entry = self._read(stream, max(until - now, 0.001))  # a Cluster: each wait reads its own stream
        if entry is not None or time.monotonic() < self.ttl:
            return entry
        leases = [self.prefix + "lease", self.prefix + "gone:" + self.token]
        left = tier.run("live", leases, [self.token])
        if type(left) is not int:
            raise _Trouble("LIVE replied with no integer")
        if left == -2:
            entry = self._read(stream, 0)  # published as the lease went: it is there
            if entry is None:
                raise AbortError(key, self.owner_pid, f"the owner's lease on host {self.owner_host} expired")
            return entry
        self.ttl = time.monotonic() + (left if left >= 0 else tier.lease * 1000) / 1000  # renewed
        return None

    def _read(self, stream: str, block: float) -> dict[bytes, bytes] | None:
        """One read of the call's stream from its start: blocking up to ``block`` s (0: not at all)."""
        tier = self.tier
        try:
            client = tier.client()
            if hasattr(client, "get_node_from_key"):  # a Redis Cluster: the node that holds the stream
                client = client.get_redis_connection(client.get_node_from_key(stream))
            pool = client.connection_pool
            conn = pool.get_connection()
        except tier._errors as e:
            raise _Trouble(f"{type(e).__name__}: {e}") from e
        try:
            args: list[object] = ["XREAD", "COUNT", 1]
            if block > 0:
                args += ["BLOCK", max(int(block * 1000), 1)]
            conn.send_command(*args, "STREAMS", stream, "0-0")
            reply = conn.read_response(timeout=block + READ_MARGIN)
        except tier._errors as e:
            conn.disconnect()
            raise _Trouble(f"{type(e).__name__}: {e}") from e
        except BaseException:
            conn.disconnect()  # a reply may still come on it: nobody else may read it
            raise
        finally:
            pool.release(conn)
        found = _stream_entries(reply)
        return found[0][2] if found else None

    def _outcome(self, key: str | bytes, entry: dict[bytes, bytes], waited: float) -> Result[Any]:
        tier = self.tier
        kind, payload = entry.get(b"o"), entry.get(b"p")
        if kind not in (_PAYLOAD, _NOT_SHARED) or type(payload) is not bytes:
            raise CorruptPayload(f"the outcome of key {key!r} in Redis has no kind or payload")
        if tier.secret is not None:
            sig = tier._sign(self.prefix, self.token, self.fence, kind, payload)
            if not hmac.compare_digest(sig, entry.get(b"s", b"")):
                raise CorruptPayload(f"the outcome of key {key!r} in Redis is not signed with the secret")
        if kind == _NOT_SHARED:
            raise RunHere(f"the outcome of key {key!r} is larger than max_remote_bytes")
        try:
            value = _codec.unpack(payload, tier.opts.codec, key=key, owner_pid=self.owner_pid)
        except BaseException as e:
            e.add_note(f"(the owner ran on host {self.owner_host})")
            raise
        return Result(value, True)

    def rename(self, tid: int) -> None:
        pass

    def note(self, data: bytes) -> None:
        pass

    def recover(self, wait: bool = True) -> None:
        """An exception ended the caller's part: an owner's call is aborted for the remote waiters."""
        if self.role != OWN or self.done:
            return
        self.done = True
        self.tier.let_go(self, ended=True)
        abort = _codec.pack_abort(f"the owner's caller ended early (host {self.tier.host})")

        def publish() -> None:
            with contextlib.suppress(_Trouble, TierUnavailable):
                self.tier.publish(self.prefix, self.token, self.fence, _PAYLOAD, abort)

        if wait:
            publish()
        else:
            start_thread(threading.Thread(target=publish, daemon=True, name="mpflight-abort"))

    def hand(self) -> None:
        pass

    def close(self) -> None:
        pass

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn, run with this call's fence number for mpflight.fence() (a coroutine fn as one)."""
        fence_no = self.fence
        if inspect.iscoroutinefunction(fn):

            async def fenced_coroutine(*args: Any, **kwargs: Any) -> Any:
                token = _fence.set(fence_no)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    _fence.reset(token)

            return fenced_coroutine

        def fenced(*args: Any, **kwargs: Any) -> Any:
            token = _fence.set(fence_no)
            try:
                return fn(*args, **kwargs)
            finally:
                _fence.reset(token)

        return fenced


def _text(value: object, what: str) -> str:
    if type(value) is not bytes or len(value) > 256:
        raise _Trouble(f"ENTER replied a bad {what}")
    return value.decode("utf-8", "replace")


def _entered(reply: object) -> tuple[int, tuple[str, int, str, int, int]]:
    """ENTER's reply, checked: (1 own, 2 join, 3 collision or 4 a lingering outcome, (token, fence,
    host, pid, ttl ms))."""
    if type(reply) is not list or not reply or type(reply[0]) is not int:
        raise _Trouble("ENTER replied no role")
    role = reply[0]
    if role == 3:
        return 3, ("", 0, "", 0, 0)
    if role not in (1, 2, 4) or len(reply) != 6:
        raise _Trouble(f"ENTER replied role {role!r} with {len(reply)} fields")
    token = _text(reply[1], "token")
    fence_no, ttl = reply[2], reply[5]
    if isinstance(fence_no, bytes) and fence_no.isdigit():
        fence_no = int(fence_no)
    pid = reply[4]
    if isinstance(pid, bytes) and pid.isdigit():
        pid = int(pid)
    if (
        len(token) != 32
        or any(c not in "0123456789abcdef" for c in token)
        or type(fence_no) is not int
        or type(pid) is not int
        or type(ttl) is not int
    ):
        raise _Trouble("ENTER replied a lease with bad fields")
    return role, (token, fence_no, _text(reply[3], "host"), pid, max(ttl, 0))


def _stream_entries(reply: object) -> list[tuple[bytes, bytes, dict[bytes, bytes]]]:
    """An XREAD reply as (stream, entry id, fields) of each stream's first entry; [] for none."""
    if reply is None or reply == []:
        return []
    found = []
    try:
        streams: Any = list(reply.items()) if isinstance(reply, dict) else reply  # RESP3, RESP2
        for name, entries in streams:
            entry_id, flat = entries[0]
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            if type(name) is not bytes or type(entry_id) is not bytes:
                raise TypeError("a stream's name or an entry's id is not a string")
            if not all(type(k) is bytes and type(v) is bytes for k, v in fields.items()):
                raise TypeError("an entry's fields are not strings")
            found.append((name, entry_id, fields))
    except (TypeError, ValueError, IndexError) as e:
        raise _Trouble(f"XREAD replied something else than stream entries: {e}") from e
    return found


def _after_fork_in_child() -> None:
    for tier in list(_tiers):
        tier._owned, tier._ended, tier._renewer, tier._reader = {}, {}, None, None
        tier._lock, tier._wake = threading.Lock(), threading.Event()  # a parent's thread may have held it


os.register_at_fork(after_in_child=_after_fork_in_child)
