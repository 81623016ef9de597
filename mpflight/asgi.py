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
        run = _Run(self.app, scope, send, self.policy.max_body)
        key = self.policy.key(method, _target(scope, headers), headers)
        try:
            outcome = await self.policy.group.do_async(key, run.run)
        except Exception as e:
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
            await run.replay()
            return
        if outcome[0] == SHARED:
            _, status, response_headers, body, vary, seen = outcome
            if vary_digest(vary, headers) == seen:
                await _respond(send, status, [(bytes(n), bytes(v)) for n, v in response_headers], body)
                return
        await self.app(scope, receive, send)  # not for others, or it varies on what differs here


class _Run:
    """The owner's run of the app, as a coroutine function for do_async: it collects the response and
    says whether others may have it. A stream, or a body past max_body, goes to this request's client
    as it comes, and to nobody else."""

    def __init__(self, app: App, scope: Scope, send: Send, max_body: int) -> None:
        self.app = app
        self.scope = scope
        self.client_send = send
        self.max_body = max_body
        self.ran = False
        self.messages: list[Message] = []
        self.size = 0
        self.forwarding = False  # the response goes to this request's client as it comes

    async def run(self) -> tuple[Any, ...]:
        self.ran = True
        requested = False
        never = asyncio.Event()

        async def receive() -> Message:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await never.wait()  # the shared run does not end with its first client
            raise AssertionError("unreachable")

        await self.app(self.scope, receive, self.send)
        if self.forwarding:
            return (PASS,)
        start = next((m for m in self.messages if m["type"] == "http.response.start"), None)
        if start is None or self.messages[-1].get("more_body", False):
            raise RuntimeError("the ASGI app returned without a complete response")
        headers = [
            (bytes(n).decode("latin-1"), bytes(v).decode("latin-1")) for n, v in start.get("headers", [])
        ]
        if not_shared(headers) is not None:
            return (PASS,)
        vary = response_vary(headers)
        body = b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")
        raw = [(bytes(n), bytes(v)) for n, v in start.get("headers", [])]
        return (SHARED, start["status"], raw, body, vary, vary_digest(vary, _headers(self.scope)))

    async def send(self, message: Message) -> None:
        if self.forwarding:
            await self.client_send(message)
            return
        self.messages.append(message)
        if message["type"] == "http.response.body":
            self.size += len(message.get("body", b""))
        elif message["type"] == "http.response.start":
            headers = [
                (bytes(n).decode("latin-1"), bytes(v).decode("latin-1"))
                for n, v in message.get("headers", [])
            ]
            if not_shared(headers) == "a stream":
                await self._forward()
                return
        if self.size > self.max_body:
            await self._forward()

    async def _forward(self) -> None:
        """From now on the response goes straight to this request's client (and to nobody else)."""
        self.forwarding = True
        held, self.messages = self.messages, []
        for message in held:
            await self.client_send(message)

    async def replay(self) -> None:
        """Send this request's client the response the run collected (unless it went there already)."""
        if self.forwarding:
            return
        for message in self.messages:
            await self.client_send(message)


async def _respond(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _headers(scope: Scope) -> dict[str, str]:
    """The request headers, lower-cased (repeated ones joined by commas, as HTTP allows)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        n, v = bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1")
        out[n] = f"{out[n]}, {v}" if n in out else v
    return out


def _target(scope: Scope, headers: dict[str, str]) -> str:
    server = scope.get("server") or ("", "")
    host = headers.get("host") or f"{server[0]}:{server[1]}"
    path = scope.get("root_path", "") + scope.get("path", "/")
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    return f"{scope.get('scheme', 'http')}://{host}{path}" + (f"?{query}" if query else "")
