"""Request collapsing, what the WSGI and ASGI middlewares share: which requests may collapse, the key
of a request, which responses may be handed to others, and the outcome that carries one.

A request collapses only when it is safe to: GET or HEAD, no request body, no Range header. Its key
is the method, scheme, host, script root, path and query, plus a digest of the request headers named
in ``vary`` (by default Authorization and Cookie: two users never share a response). The header
values themselves never reach shared memory, only their digest.

The owner's response is handed to the waiters only when it is complete and no larger than
``max_body``, and says nothing that makes it one client's: no Set-Cookie, no ``Cache-Control:
private`` or ``no-store``, no ``Vary: *``, not a stream (``text/event-stream``, or a body that ran
past the limit). Otherwise the outcome says PASS and each waiter runs the app itself (the hit-for-pass
of HTTP caches). The outcome also carries a digest of the owner's values of the headers the
response's own Vary names: a waiter whose values differ runs the app itself.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

from ._errors import AbortError, WaitTimeout
from ._group import Group

# Request headers that are part of the key unless the caller says otherwise.
DEFAULT_VARY: Final = ("Authorization", "Cookie")
# The largest body handed to waiters; larger responses go to their own client only.
DEFAULT_MAX_BODY: Final = 1024 * 1024
# What a waiter of a call whose owner died (or that waited past its timeout) answers.
RETRY_AFTER: Final = "1"
METHODS: Final = frozenset({"GET", "HEAD"})
PASS: Final = "pass"  # noqa: S105 (a word, not a password) the outcome of a response that is not handed to others
SHARED: Final = "shared"

_TOKENS = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


class Policy:
    """The options of one collapsing middleware and the Group behind it, made on first use in each
    process (so that a server that forks its workers after importing the app forks no table)."""

    def __init__(
        self, name: str, vary: Iterable[str], max_body: int, methods: Iterable[str], options: dict[str, Any]
    ) -> None:
        if isinstance(vary, str):
            raise TypeError("vary must be a list of header names, not a str")
        names = tuple(vary)
        for header in names:
            if not isinstance(header, str) or not _TOKENS.fullmatch(header):
                raise ValueError(f"vary must name HTTP headers, not {header!r}")
        if type(max_body) is not int or max_body < 0:
            raise ValueError(f"max_body must be an int of bytes >= 0, not {max_body!r}")
        wanted = frozenset(m.upper() for m in methods)
        if not wanted <= METHODS:
            raise ValueError(f"only GET and HEAD requests collapse, not {sorted(wanted - METHODS)}")
        self.vary = tuple(sorted({h.lower() for h in names}))
        self.max_body = max_body
        self.methods = wanted
        self.name = name
        self.options = options
        limit = options.get("max_result_bytes")
        if isinstance(limit, int) and max_body >= limit:
            raise ValueError(
                f"max_body ({max_body}) must be below max_result_bytes ({limit}): a shared body travels in it"
            )
        Group(name, **options).close()  # bad options fail here, at the app's start, not per request
        self._group: Group | None = None
        self._making = threading.Lock()

    @property
    def group(self) -> Group:
        group = self._group
        if group is None:
            with self._making:  # the first requests of a threaded worker: one handle, not one each
                group = self._group
                if group is None:
                    group = self._group = Group(self.name, **self.options)
        return group

    def key(self, method: str, url: tuple[str, str, str, str], headers: Mapping[str, str]) -> str:
        """The call's key: the request line, and a digest of the vary headers' values when any is sent.

        ``url`` is (scheme, host, path with its script root, query), each percent-quoted here, so that
        no two different requests make one key (``/a%3Fb`` is not ``/a?b``; a host never holds a
        path)."""
        scheme, host, path, query = url
        target = f"{quote(scheme, safe='')}://{quote(host, safe=':[]')}{quote(path, safe=_PATH_SAFE)}"
        if query:
            target += "?" + quote(query, safe=_PATH_SAFE + "?")
        sent = [(h, headers[h]) for h in self.vary if h in headers]
        return f"{method} {target}" + (f" #{digest(sent)}" if sent else "")


# What stays as it is in a key's path and query (RFC 3986's pchar, without the percent sign).
_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"
# Conditional requests: their answer (304, 412) depends on what the client holds.
CONDITIONAL: Final = ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range")


def collapsible(method: str, headers: Mapping[str, str], policy: Policy) -> bool:
    """Whether a request may share a response: a GET or HEAD without a body, a range or a condition."""
    if method not in policy.methods or "range" in headers or "transfer-encoding" in headers:
        return False
    if any(h in headers for h in CONDITIONAL):
        return False
    length = headers.get("content-length", "0").strip()
    return length in ("", "0")


def digest(pairs: Iterable[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, value in pairs:
        h.update(name.encode("latin-1") + b"\0" + value.encode("latin-1") + b"\0")
    return h.hexdigest()[:32]


def tokens(values: Iterable[str]) -> set[str]:
    """The lower-cased comma-separated tokens of a header's values (directives' arguments dropped)."""
    return {part.split("=", 1)[0].strip().lower() for value in values for part in value.split(",")} - {""}


def response_vary(headers: Iterable[tuple[str, str]]) -> list[str]:
    """The request headers the response says it varies on, lower-cased and sorted."""
    return sorted(tokens(value for name, value in headers if name.lower() == "vary"))


def not_shared(headers: Iterable[tuple[str, str]], status: int = 200) -> str | None:
    """Why a response with these headers must not be handed to other clients, or None."""
    headers = list(headers)
    if is_stream(headers):
        return "a stream"
    if status in (304, 412):
        return f"a {status}, which answers the request's own condition"
    names = {name.lower() for name, _ in headers}
    if "set-cookie" in names:
        return "Set-Cookie"
    cache = tokens(value for name, value in headers if name.lower() == "cache-control")
    if cache & {"private", "no-store"}:
        return "Cache-Control: " + ", ".join(sorted(cache & {"private", "no-store"}))
    if "*" in response_vary(headers):
        return "Vary: *"
    return None


def is_stream(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether the response is an event stream, which goes to its own client as it comes."""
    types = [value for name, value in headers if name.lower() == "content-type"]
    return any(value.split(";", 1)[0].strip().lower() == "text/event-stream" for value in types)


def vary_digest(vary: list[str], headers: Mapping[str, str]) -> str:
    """What the request's values of the response's Vary headers look like, for comparing two requests."""
    return digest((h, headers.get(h, "\0absent")) for h in vary)


def unavailable(e: BaseException) -> tuple[int, str] | None:
    """The answer of a waiter whose call ended without an outcome: 503 (with Retry-After), or None
    when ``e`` is the app's own exception, which propagates."""
    if isinstance(e, AbortError):
        return 503, "the request that was answering this one ended without a response; try again\n"
    if isinstance(e, WaitTimeout):
        return 503, "gave up waiting for the request that was answering this one; try again\n"
    return None
