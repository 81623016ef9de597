"""Request collapsing for WSGI apps: concurrent identical requests, in every worker of the machine,
share one run of the app.

    app = mpflight.wsgi.collapse(app, name="pages")

One request runs the app; the others that arrive while it runs receive its response (status, headers
and body). What collapses, what is handed on and what is not: mpflight._collapse. The Group options
(``timeout``, ``linger``, ``on_abort``, ...) are passed through: with ``linger``, requests that come
just after a response was made get it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any

from ._collapse import (
    DEFAULT_MAX_BODY,
    DEFAULT_VARY,
    PASS,
    RETRY_AFTER,
    SHARED,
    Policy,
    collapsible,
    not_shared,
    response_vary,
    unavailable,
    vary_digest,
)
from ._errors import SerializationError

__all__ = ["collapse"]

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
App = Callable[[Environ, StartResponse], Iterable[bytes]]


def collapse(
    app: App,
    *,
    name: str,
    vary: Iterable[str] = DEFAULT_VARY,
    max_body: int = DEFAULT_MAX_BODY,
    methods: Iterable[str] = ("GET", "HEAD"),
    **options: Any,
) -> App:
    """Wrap the WSGI ``app`` so that concurrent identical GET and HEAD requests share one response.

    ``name`` names the Group (its table is shared by every worker process); ``vary`` lists the request
    headers that are part of the key besides the request line (default Authorization and Cookie);
    ``max_body`` bounds the bodies handed to other requests; the rest are Group options.
    """
    policy = Policy(name, vary, max_body, methods, options)
    return _Collapsed(app, policy)


class _Collapsed:
    def __init__(self, app: App, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        headers = _headers(environ)
        if not collapsible(method, headers, self.policy):
            return self.app(environ, start_response)
        run = _Run(self.app, environ, self.policy.max_body)
        key = self.policy.key(method, _url(environ), headers)
        try:
            outcome = self.policy.group.do(key, run)
        except Exception as e:
            if run.ran:  # the app's own exception (mpflight's too, if the app uses it)
                raise
            if isinstance(e, SerializationError):  # the owner's response could not travel here
                return self.app(environ, start_response)
            answer = unavailable(e)
            if answer is None:
                raise
            status, text = answer
            start_response(
                f"{status} Service Unavailable",
                [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", RETRY_AFTER)],
            )
            return [text.encode()]
        if run.ran:  # this request ran the app: it answers with what it made, shared or not
            return run.respond(start_response)
        if outcome[0] == SHARED:
            _, status, response_headers, body, vary, seen = outcome
            if vary_digest(vary, headers) == seen:
                start_response(status, [(n, v) for n, v in response_headers])
                return [body]
        return self.app(environ, start_response)  # not for others, or it varies on what differs here


class _Run:
    """The owner's run of the app: it reads the response, and says whether others may have it."""

    def __init__(self, app: App, environ: Environ, max_body: int) -> None:
        self.app = app
        self.environ = environ
        self.max_body = max_body
        self.ran = False
        self.status = ""
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.rest: Iterator[bytes] | None = None  # what was not read (a stream, or past max_body)
        self.iterable: Iterable[bytes] | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and self.rest is not None:
            raise exc_info[1].with_traceback(exc_info[2])  # the response is already on its way
        self.status, self.headers = str(status), [(str(n), str(v)) for n, v in headers]
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write(): its bytes come before the iterable's."""
        if self.rest is not None:
            raise RuntimeError("write() after the response was handed to its own client")
        self.chunks.append(data)
        self.size += len(data)

    def __call__(self) -> tuple[Any, ...]:
        self.ran = True
        iterable = self.iterable = self.app(self.environ, self.start_response)
        it = iter(iterable)
        try:
            for chunk in it:
                self.chunks.append(chunk)
                self.size += len(chunk)
                # Not for others (the headers say so, or the body runs past the limit): the waiters
                # need not wait for the rest, which goes to this request's client as it comes.
                if self.size > self.max_body or (
                    self.status and not_shared(self.headers, _code(self.status))
                ):
                    self.rest = it
                    return (PASS,)
        except BaseException:
            self.close()
            raise
        if not self.status:
            self.close()
            raise RuntimeError("the WSGI app returned without calling start_response")
        if not_shared(self.headers, _code(self.status)) is not None or self.size > self.max_body:
            return (PASS,)
        vary = response_vary(self.headers)
        body = b"".join(self.chunks)
        self.chunks = [body]
        headers = tuple(self.headers)  # the outcome's own: threads of this process get this very object
        return (SHARED, self.status, headers, body, vary, vary_digest(vary, _headers(self.environ)))

    def respond(self, start_response: StartResponse) -> Iterable[bytes]:
        """The owner's own response: what was read, then what was not, closing the app's iterable."""
        start_response(self.status, list(self.headers))
        if self.rest is None:
            self.close()
            return self.chunks
        return _Rest(self.chunks, self.rest, self.close)

    def close(self) -> None:
        close = getattr(self.iterable, "close", None)
        self.iterable = None
        if close is not None:
            close()


class _Rest:
    """An owner's response that was not read to its end: the read chunks, then the rest, streamed."""

    def __init__(self, read: list[bytes], rest: Iterator[bytes], close: Callable[[], None]) -> None:
        self.read, self.rest, self._close = read, rest, close

    def __iter__(self) -> Iterator[bytes]:
        yield from self.read
        yield from self.rest

    def close(self) -> None:
        self._close()


def _headers(environ: Environ) -> dict[str, str]:
    """The request headers, lower-cased, from the environ's HTTP_* and CONTENT_* entries."""
    out = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
    for k in ("CONTENT_LENGTH", "CONTENT_TYPE"):
        if environ.get(k):
            out[k.replace("_", "-").lower()] = environ[k]
    return out


def _url(environ: Environ) -> tuple[str, str, str, str]:
    scheme = environ.get("wsgi.url_scheme", "http")
    host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
    path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return scheme, host, path, environ.get("QUERY_STRING", "")


def _code(status: str) -> int:
    try:
        return int(status.split(None, 1)[0])
    except (ValueError, IndexError):
        return 0
