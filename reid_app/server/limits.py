"""How much work the server takes on at once, and how long a client may take to ask: the rules
that keep one client (or a few hundred connections) from shutting the others out. The reasons
are in :mod:`.security`'s docstring, beside the access rules; the numbers are here.

Connections (uvicorn's HTTP/1.1 protocol, :func:`guarded_h11`):

* a request head (request line and headers) must arrive whole within :data:`HEADER_TIMEOUT_S` of
  the connection opening or of its previous answer, and its body within :data:`BODY_TIMEOUT_S`
  of the head; otherwise the connection is closed. uvicorn itself only times out connections
  idle after an answer: one that never finishes its headers stays open for ever;
* a pipelined request (sent before the answer to the previous one) gets the same times, from
  that answer on;
* at most :func:`max_connections` are open, which leaves room below the file-descriptor limit
  for the database, the models' files and a request's temporary files. A new connection past
  that closes the oldest one still waiting for its request head (a real client sends its head
  at once; slow ones are the old waiting ones); when every connection is busy with a request,
  the new one is closed. uvicorn's ``limit_concurrency`` does not do this job: it counts open
  connections and refuses the *request* that finds too many, so idle connections would turn
  real requests away, and its 503 bypasses the app (and the security headers).

Requests (:class:`HeavyWork`, a dependency of the heavy routes):

* heavy requests (searches, identity recomputes, the cameras overview, video frames) run at most
  :data:`HEAVY_WORKERS` at a time, and at most :data:`HEAVY_QUEUE` more wait (without holding a
  thread). Past that, or after :data:`QUEUE_WAIT_S` of waiting, the answer is 503 at once, with
  ``Retry-After``. The models run one batch at a time anyway: more in parallel only use memory;
* at most :data:`UPLOADS_AT_ONCE` requests with a body are in progress (the security middleware
  counts them from their head to their answer); one more is answered 503 at once, with
  ``Retry-After``, before its body is read;
* everything else never waits behind them: the page's files are served from memory on the event
  loop, and the other routes find free threads (heavy ones hold at most HEAVY_WORKERS of the
  :data:`WORKER_THREADS`) and free database connections (the pool holds two per thread: a
  search reads a thumbnail inside its own session).
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator
from typing import Any

import h11
from starlette.exceptions import HTTPException

#: Seconds a connection may take to send a request head (browsers and curl send it at once).
HEADER_TIMEOUT_S = 10.0
#: Seconds a request may take to send its body after its head: 20 MB at ~1.5 Mbit/s.
BODY_TIMEOUT_S = 120.0
#: Seconds an idle connection is kept open after an answer (uvicorn's default, stated).
KEEP_ALIVE_S = 5
#: Threads that run requests (the event loop's default pool, resized at start-up).
WORKER_THREADS = 24
#: Heavy requests running at once, and waiting beyond them.
HEAVY_WORKERS = 8
HEAVY_QUEUE = 24
#: Longest wait for a heavy slot before a 503; the answer's Retry-After.
QUEUE_WAIT_S = 30.0
RETRY_AFTER_S = 5
#: Connections waiting to be accepted (listen's backlog). asyncio also accepts up to this many in
#: one go before any of them is seen (and one over the limit closed), so it is part of the reserve.
BACKLOG = 128
#: File descriptors kept for everything but connections: the database (two connections of about
#: three files each per thread), a request's temporary files, model and index files, logs, and
#: a burst of accepted connections.
FD_RESERVE = 128 + 8 * WORKER_THREADS + BACKLOG
#: Fewest connections allowed, however low the file-descriptor limit.
MIN_CONNECTIONS = 16
#: Below this many connections, ``serve`` warns at start-up that the limit is too low.
FEW_CONNECTIONS = 64
#: Requests with a body (uploads) in progress at once, from their head to their answer: each may
#: hold up to two copies of --max-upload-mb on disk (the form parser's spool and the query file),
#: so their number is bounded, not only by the connections. Room for every heavy request running
#: and waiting (they have read their bodies), and a few more still uploading.
UPLOADS_AT_ONCE = HEAVY_WORKERS + HEAVY_QUEUE + 8


def raise_fd_limit() -> int:
    """Raise this process's soft file-descriptor limit to its hard limit (as many servers do at
    start-up); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container may refuse: the soft limit stays
            pass
    return soft


def max_connections(fd_limit: int | None = None) -> int:
    """Open connections allowed under ``fd_limit`` (default: this process's soft limit)."""
    if fd_limit is None:
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(MIN_CONNECTIONS, fd_limit - FD_RESERVE)


def guarded_h11(
    connections_allowed: int, header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S
) -> type:
    """uvicorn's h11 protocol with the connection rules of the module docstring (a class per
    server: it keeps that server's connections that wait for a request head)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    waiting: dict[Any, None] = {}  # connections waiting for a request head, oldest first

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _phase = "head"

        def connection_made(self, transport: Any) -> None:  # noqa: ANN401 - asyncio's own type
            super().connection_made(transport)
            if len(self.connections) > connections_allowed:
                oldest = next(iter(waiting), None)
                if oldest is None:  # all busy answering: no room for one more
                    transport.close()
                    return
                oldest._drop()
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                # The next request's time starts, whatever the phase of the last one. super() has
                # already parsed a pipelined next request that came with or before the answer: its
                # head may be in (then its body's time starts now) or all of it (nothing to wait
                # for), and no data_received follows to notice; _follow() does.
                self._await_head()
                self._follow()

        def connection_lost(self, exc: Exception | None) -> None:
            waiting.pop(self, None)
            self._disarm()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._phase = "head"
            waiting[self] = None
            self._arm(header_timeout_s)

        def _follow(self) -> None:
            """After the parser has seen more: the head has come (the body's time starts), or the
            whole request has (nothing more to wait for)."""
            state = self.conn.their_state
            if state is h11.IDLE or self._phase == "answering":
                return
            waiting.pop(self, None)
            if state is h11.SEND_BODY:
                if self._phase == "head":
                    self._phase = "body"
                    self._arm(body_timeout_s)
            else:
                self._phase = "answering"
                self._disarm()

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._drop)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _drop(self) -> None:
            waiting.pop(self, None)
            self._disarm()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(
    app: Any,  # noqa: ANN401 - any ASGI application
    host: str,
    port: int,
    *,
    connections_allowed: int | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    body_timeout_s: float = BODY_TIMEOUT_S,
) -> Any:  # noqa: ANN401 - uvicorn.Config, imported late (heavy)
    """The uvicorn configuration ``reid-app serve`` runs with: the connection rules of the
    module docstring, no access log (the server logs refusals and failures itself)."""
    import uvicorn

    protocol = guarded_h11(
        max_connections() if connections_allowed is None else connections_allowed, header_timeout_s, body_timeout_s
    )
    return uvicorn.Config(
        app, host=host, port=port, http=protocol, timeout_keep_alive=KEEP_ALIVE_S, backlog=BACKLOG,
        log_level="warning", access_log=False,
    )


class HeavyWork:
    """The admission rule for heavy requests (module docstring), as a FastAPI dependency: the
    request holds a slot from before its handler runs until it has returned. Its body is read
    before: a slow upload does not hold a slot."""

    def __init__(self, workers: int = HEAVY_WORKERS, queue: int = HEAVY_QUEUE, wait_s: float = QUEUE_WAIT_S) -> None:
        self.workers, self.queue, self.wait_s = workers, queue, wait_s
        self._slots: asyncio.Semaphore | None = None
        self._pending = 0  # running and waiting

    async def __call__(self) -> AsyncIterator[None]:
        if self._slots is None:  # made on the server's event loop, at its first heavy request
            self._slots = asyncio.Semaphore(self.workers)
        if self._pending >= self.workers + self.queue:
            raise _busy("too many searches and recomputes are running and waiting")
        self._pending += 1
        try:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a slot acquired just as
                # the time ran out (it is never released).
                async with asyncio.timeout(self.wait_s):
                    await self._slots.acquire()
            except TimeoutError:
                raise _busy(f"no search or recompute slot came free within {self.wait_s:.0f} s") from None
            try:
                yield
            finally:
                self._slots.release()
        finally:
            self._pending -= 1


def _busy(why: str) -> HTTPException:
    return HTTPException(
        503, f"the server is busy: {why}; try again shortly", headers={"Retry-After": str(RETRY_AFTER_S)}
    )
