"""Request collapsing for ASGI apps: concurrent identical requests, in every task of every worker of
the machine, share one run of the app.

    app = mpflight.asgi.collapse(app, name="pages")

As mpflight.wsgi, for the ``http`` scope (lifespan and websocket pass through). The shared run is
not its first client's: it reads a request with no body and never a disconnect, so when that client
goes away the others still get the response. Waiting never blocks the event loop (``do_async``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
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

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def collapse(
    app: App,
    *,
    name: str,
    vary: Iterable[str] = DEFAULT_VARY,
    max_body: int = DEFAULT_MAX_BODY,
    methods: Iterable[str] = ("GET", "HEAD"),
    **options: Any,
) -> App:
    """Wrap the ASGI ``app`` so that concurrent identical GET and HEAD requests share one response.

    The options are mpflight.wsgi.collapse's: ``name`` names the Group, ``vary`` the request headers
    in the key (default Authorization and Cookie), ``max_body`` bounds a shared body, the rest are
    Group options.
    """
    return _Collapsed(app, Policy(name, vary, max_body, methods, options))


class _Collapsed:
    def __init__(self, app: App, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET").upper()
        headers = _headers(scope)
        if scope["type"] != "http" or not collapsible(method, headers, self.policy):
            await self.app(scope, receive, send)
            return
        run = _Run(self.app, scope, receive, send, self.policy.max_body)
        key = self.policy.key(method, _url(scope, headers), headers)
        try:
            outcome = await self.policy.group.do_async(key, run.run)
        except Exception as e:
            if run.ran:  # the app's own exception (mpflight's too, if the app uses it)
                raise
            if isinstance(e, SerializationError):  # the owner's response could not travel here
                await self.app(scope, receive, send)
                return
            answer = unavailable(e)
            if answer is None:
                raise
            status, text = answer
            await _respond(
                send,
                status,
                [(b"content-type", b"text/plain; charset=utf-8"), (b"retry-after", RETRY_AFTER.encode())],
                text.encode(),
            )
            return
        if run.ran:  # this request ran the app: it answers with what it made, shared or not
            await run.finish()
            return
        if outcome[0] == SHARED:
            _, status, response_headers, body, vary, seen = outcome
            if vary_digest(vary, headers) == seen:
                await _respond(send, status, [(bytes(n), bytes(v)) for n, v in response_headers], body)
                return
        await self.app(scope, receive, send)  # not for others, or it varies on what differs here


class _Run:
    """The owner's run of the app, as a coroutine function for do_async: it collects the response and
    says whether others may have it.

    The app runs in a task of its own. While its response may still be shared, it reads a request with
    no body and no disconnect (its first client going away does not end it for the others). Once the
    response is known not to be for others (its headers say so, it is a stream, its body runs past
    max_body, or it is not a plain start-and-body response), the call ends with PASS at once, so the
    waiters need not wait for it, and the rest goes to this request's client as it comes, with the
    client's own receive (a stream sees its client leave).
    """

    def __init__(self, app: App, scope: Scope, receive: Receive, send: Send, max_body: int) -> None:
        self.app = app
        self.scope = scope
        self.client_receive = receive
        self.client_send = send
        self.max_body = max_body
        self.ran = False
        self.messages: list[Message] = []
        self.size = 0
        self.forwarding = False  # the response goes to this request's client as it comes
        self.passed = asyncio.Event()  # set when forwarding starts
        self.settled = asyncio.Event()  # set when forwarding starts or the response is complete
        self.requested = False  # the app has read the (empty) request
        self.client_read = False  # that request was taken from the client's own receive
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> tuple[Any, ...]:
        self.ran = True
        task = self.task = asyncio.ensure_future(self.app(self.scope, self.receive, self.send))
        passed = asyncio.ensure_future(self.passed.wait())
        try:
            await asyncio.wait([task, passed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            passed.cancel()
        if self.forwarding:
            return (PASS,)
        task.result()  # the app's exception, for every caller
        start = next((m for m in self.messages if m["type"] == "http.response.start"), None)
        last = self.messages[-1] if self.messages else {}
        if start is None or last.get("type") != "http.response.body" or last.get("more_body", False):
            raise RuntimeError("the ASGI app returned without a complete response")
        headers = [
            (bytes(n).decode("latin-1"), bytes(v).decode("latin-1")) for n, v in start.get("headers", [])
        ]
        if not_shared(headers, start["status"]) is not None:
            return (PASS,)
        vary = response_vary(headers)
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        raw = tuple((bytes(n), bytes(v)) for n, v in start.get("headers", []))
        return (SHARED, int(start["status"]), raw, body, vary, vary_digest(vary, _headers(self.scope)))

    async def receive(self) -> Message:
        if self.forwarding:
            return await self._client_receive()
        if not self.requested:
            self.requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        # The shared run does not end with its first client: until its response is complete (then
        # nobody is left to listen) or goes to that client alone, there is nothing to hear.
        await self.settled.wait()
        if self.forwarding:
            return await self._client_receive()
        return {"type": "http.disconnect"}

    async def _client_receive(self) -> Message:
        """The client's own receive, past the request the app already read (an empty one)."""
        message = await self.client_receive()
        if self.requested and message["type"] == "http.request" and not self.client_read:
            self.client_read = True
            message = await self.client_receive()
        return message

    async def send(self, message: Message) -> None:
        if self.forwarding:
            await self.client_send(message)
            return
        self.messages.append(message)
        kind = message["type"]
        if kind == "http.response.body":
            self.size += len(message.get("body", b""))
            if self.size > self.max_body:
                await self._forward()
            elif not message.get("more_body", False):
                self.settled.set()
        elif kind == "http.response.start":
            headers = [
                (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                for n, v in message.get("headers", [])
            ]
            if message.get("trailers") or not_shared(headers, int(message.get("status", 200))) is not None:
                await self._forward()
        else:  # a file to send, trailers: not what a waiter can be handed
            await self._forward()

    async def _forward(self) -> None:
        """From now on the response goes straight to this request's client (and to nobody else)."""
        self.forwarding = True
        self.passed.set()
        self.settled.set()
        held, self.messages = self.messages, []
        for message in held:
            await self.client_send(message)

    async def finish(self) -> None:
        """This request's own response: what the run collected, or the rest of the forwarded one."""
        if self.forwarding:
            if self.task is not None:
                await self.task
            return
        for message in self.messages:
            await self.client_send(message)


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _text_headers(message: Message) -> list[tuple[str, str]]:
    return [(bytes(n).decode("latin-1"), bytes(v).decode("latin-1")) for n, v in message.get("headers", [])]


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers, lower-cased (repeated ones joined by commas, as HTTP allows)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        n, v = bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1")
        out[n] = f"{out[n]}, {v}" if n in out else v
    return out


def _url(scope: Scope, headers: dict[str, str]) -> tuple[str, str, str, str]:
    server = scope.get("server") or ("", "")
    host = headers.get("host") or f"{server[0]}:{server[1]}"
    path = scope.get("root_path", "") + scope.get("path", "/")
    return scope.get("scheme", "http"), host, path, bytes(scope.get("query_string", b"")).decode("latin-1")
