"""Who may talk to the server, how much they may send, and what they are told.

Access:

* Bound to a loopback address (the default, 127.0.0.1), only this machine can connect. The
  ``Host`` header must then name a loopback host too, so that a web page elsewhere that points
  a DNS name at 127.0.0.1 (DNS rebinding) cannot read the footage through the operator's browser.
  It is parsed strictly (a name or an address, then only an optional port): ``[::1]evil.com`` is
  no loopback host.
* Bound to any other address, an access token is required (``$REID_APP_TOKEN`` or a file) and
  every request, page and API alike, must carry it: ``Authorization: Bearer TOKEN`` (API
  clients), or the ``reid_app_token`` cookie that the page sets when it is first opened as
  ``/?token=TOKEN`` (the token is then dropped from the address bar by a redirect). The cookie is
  HttpOnly and SameSite=Strict, so another site's page cannot make the browser send it, and holds
  a value derived from the token (:func:`session_value`), not the token: what a browser stores is
  no API token. When a token is configured on a loopback address, it is checked there too.
* A request that changes something (any method but GET, HEAD, OPTIONS) must come from this
  server's own page when a browser sends it: a ``Sec-Fetch-Site`` other than same-origin (or
  none) and an ``Origin`` other than the host the request is addressed to are refused (403).
  Otherwise any web page the operator opens could make the browser post a form here (a cookie or
  a loopback address does not stop that: the browser adds the cookie, and it can reach
  127.0.0.1; SameSite does not stop a page of the same site), e.g. re-cluster the identities so
  that an erasure by identity deletes the wrong tracks. Clients that are no browser send neither
  header, and nothing can make them send a request on another site's behalf.

How much a client may send (and make the server do):

* Request bodies are limited (``max_upload_bytes``): a larger ``Content-Length`` is refused before
  anything is read, and every body byte is counted as the app reads it, whatever the framing,
  and refused past the limit (413); nothing is buffered here, so an unfinished upload holds no
  memory beyond what the form parser keeps (it spools files past 1 MB to disk). A request with
  both ``Content-Length`` and ``Transfer-Encoding`` is refused (400): the limit would read one
  framing and the parser the other (and a proxy in front might read a third).
* Uploads: at most ``uploads_at_once`` requests with a body are in progress at once (each holds
  its body on disk until it is answered); past that a request with a body is answered 503 with
  ``Retry-After`` before any of it is read (:mod:`.limits`).
* Connections and time (:mod:`.limits`): a request head must arrive within 10 s and its body
  within 120 s, or the connection is closed; the number of open connections stays below the
  file-descriptor limit (the oldest connection still waiting for its head makes room for a new
  one), so that a few hundred connections that never finish their headers (slowloris) neither
  exhaust the descriptors nor shut other clients out.
* Work: heavy requests (searches, recomputes, the cameras overview, video frames) run a few at a
  time with a bounded queue behind them; past it the answer is 503 at once with ``Retry-After``.
  The page's files, the status and the reads never wait behind them, nor for a database
  connection (:mod:`.limits`). An image is refused before decoding when its header says it is
  over 50 megapixels or its markers show a JPEG of over 100 scans (each scan is a pass over the
  whole image: a small file can cost minutes of CPU), and a large one is decoded reduced, two at
  a time at most (:mod:`reid_app.images`).

What they are told, and how:

* Every response carries the headers of :data:`SECURITY_HEADERS`, errors too (the catch-all
  handler for bugs answers outside this middleware and adds them itself). Images carry
  ``Cross-Origin-Resource-Policy: same-origin``: another site cannot show them in its page.
* API answers name no server path (the app's ``api_json``): ids, file names and URLs. A failure
  of the machine (disk, database) is a 503 whose text names no file either, and one line in the
  log that does, for the operator; a database file removed or replaced under the running server
  is a 503 until it is restarted, and is never created again at its path.

An exposed deployment adds what this process cannot do alone: TLS (a reverse proxy in front),
per-client connection and rate limits, and timeouts at that proxy (README.md, Security).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.exceptions import HTTPException

from reid_app.errors import ReidAppError
from reid_app.server.limits import RETRY_AFTER_S, UPLOADS_AT_ONCE

TOKEN_ENV = "REID_APP_TOKEN"
COOKIE = "reid_app_token"
#: Shorter tokens can be guessed: 16 characters of a password generator are ~95 bits.
MIN_TOKEN_LENGTH = 16
#: Characters that travel unchanged in a header, a cookie and a URL query.
TOKEN_PATTERN = re.compile(rf"[A-Za-z0-9._~-]{{{MIN_TOKEN_LENGTH},512}}")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
#: Methods that change nothing here: the only ones another site's page may make a browser send.
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
#: A Host header: a name or IPv4 address, or an IPv6 address in brackets; then an optional port.
_HOST = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::[0-9]{1,5})?")
#: Sec-Fetch-Site values of a request this server's own page made, or the user typed.
OWN_FETCH_SITES = {"same-origin", "none"}
SECURITY_HEADERS = [
    # The page is our own files only: no inline script, nothing from another origin (it must work
    # offline anyway), and it cannot be framed by another site.
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),  # surveillance images must not linger in shared caches
    # Nor be shown inside another site's page (an <img> there would carry the operator's cookie).
    (b"cross-origin-resource-policy", b"same-origin"),
]


class BodyTooLarge(HTTPException):
    """Raised by the request's ``receive`` once its body passes the limit; as an HTTPException it
    reaches the app's handler (a JSON 413) from wherever the body was being read."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name given to --host) only accepts this machine's clients."""
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_token(token_file: str | None) -> str | None:
    """The access token: from ``token_file`` when given, else ``$REID_APP_TOKEN``, else None."""
    if token_file is not None:
        path = Path(token_file)
        try:
            mode = path.stat().st_mode
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ReidAppError(f"cannot read the token file {token_file}: {exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ReidAppError(
                f"the token file {token_file} can be read by other users: `chmod 600 {token_file}` first"
            )
    else:
        token = os.environ.get(TOKEN_ENV, "").strip() or None
        if token is None:
            return None
    if not TOKEN_PATTERN.fullmatch(token):
        raise ReidAppError(
            f"the access token must be at least {MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 . _ ~ - "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
        )
    return token


def require_token_for(host: str, token: str | None) -> None:
    """Refuse to listen on a non-loopback address without a token."""
    if token is None and not is_loopback(host):
        raise ReidAppError(
            f"--host {host} lets other machines connect: set an access token first (${TOKEN_ENV} or --token-file); "
            "the server only runs without one on 127.0.0.1"
        )


def _json_response(status: int, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, bytes]:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    return {"type": "http.response.start", "status": status, "headers": headers}, body


class GuardMiddleware:
    """ASGI middleware applying the rules of the module docstring to every HTTP request."""

    def __init__(
        self,
        app: Any,  # noqa: ANN401 - any ASGI application
        *,
        token: str | None,
        loopback_only: bool,
        max_upload_bytes: int,
        uploads_at_once: int = UPLOADS_AT_ONCE,
    ) -> None:
        self.app, self.token, self.loopback_only, self.max_upload_bytes = app, token, loopback_only, max_upload_bytes
        # Derived once: an HMAC per request would be work for nothing.
        self.session = session_value(token) if token is not None else None
        self.uploads_at_once = uploads_at_once
        self._uploads = 0  # requests with a body between their head and their answer (one event loop)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                missing = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *missing]}
            await send(message)

        async def refuse(status: int, text: str, extra: list[tuple[bytes, bytes]] = ()) -> None:
            start, body = _json_response(status, text, list(extra))
            await send_with_headers(start)
            await send({"type": "http.response.body", "body": body})

        if self.loopback_only and not _host_is_loopback(headers.get("host", "")):
            await refuse(400, "this server only answers requests addressed to localhost / 127.0.0.1")
            return
        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            offered = query.get("token", [None])[0]
            if scope["path"] == "/" and offered is not None and _same(offered, self.token):
                # First visit of the page: keep the token in a cookie, take it out of the address bar.
                rest = {k: v for k, v in query.items() if k != "token"}
                cookie = f"{COOKIE}={self.session}; HttpOnly; SameSite=Strict; Path=/"
                location = "/" + (f"?{urlencode(rest, doseq=True)}" if rest else "")
                await send_with_headers(
                    {
                        "type": "http.response.start",
                        "status": 303,
                        "headers": [(b"location", location.encode()), (b"set-cookie", cookie.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
            if not self._authorised(headers):
                await refuse(
                    401,
                    "access token required: send `Authorization: Bearer TOKEN`, or open the page as /?token=TOKEN",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        if scope["method"] not in SAFE_METHODS and not _from_this_origin(headers):
            await refuse(403, "refused: this request comes from a page of another site (Origin / Sec-Fetch-Site)")
            return
        if "content-length" in headers and "transfer-encoding" in headers:
            # Two framings of one body: the limit would read one and the parser the other (the
            # classic request-smuggling shape). No honest client sends both (RFC 9112 6.3).
            await refuse(400, "a request may not carry both Content-Length and Transfer-Encoding")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_upload_bytes):
            await refuse(413, self._too_large())
            return
        carries_body = "transfer-encoding" in headers or (length is not None and int(length) > 0)
        if carries_body and self._uploads >= self.uploads_at_once:
            # Each unfinished upload holds a connection and up to two copies of its body on disk
            # until it ends: their number is bounded here, before a byte of this one is read.
            await refuse(
                503,
                f"the server is busy: {self.uploads_at_once} uploads are in progress; try again shortly",
                [(b"retry-after", str(RETRY_AFTER_S).encode())],
            )
            return
        started = False

        async def send_started(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_with_headers(message)

        self._uploads += carries_body
        try:
            await self.app(scope, self._counted(receive), send_started)
        except BodyTooLarge:
            if started:  # too late for a status: the connection just ends
                raise
            await refuse(413, self._too_large())
        finally:
            self._uploads -= carries_body

    def _authorised(self, headers: dict[str, str]) -> bool:
        bearer, cookie = _presented(headers)
        if bearer is not None:
            return _same(bearer, self.token)
        return self.session is not None and _same(cookie, self.session)

    def _too_large(self) -> str:
        return f"request body too large: uploads are limited to {self.max_upload_bytes // (1 << 20)} MB"

    def _counted(self, receive: Any) -> Any:
        """``receive`` that counts the body bytes as the app reads them (in whatever framing they
        came) and raises :class:`BodyTooLarge` past the limit; nothing is held here."""
        size = 0

        async def counted() -> dict:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_upload_bytes:
                    raise BodyTooLarge(413, self._too_large())
            return message

        return counted


def _host_is_loopback(host_header: str) -> bool:
    """Whether a Host header is exactly a loopback name or address, with an optional port: parsed
    strictly (``[::1]evil.com`` is no loopback host, whatever a browser would make of it)."""
    found = _HOST.fullmatch(host_header.strip().lower())
    return found is not None and is_loopback(found["host"])


def _from_this_origin(headers: dict[str, str]) -> bool:
    """Whether a browser, if one sent the request, sent it from this server's own page: its
    Sec-Fetch-Site says same-origin (or none: typed by the user), and its Origin names the host
    and port the request is addressed to. A client without these headers is no browser: nothing
    can make it send a request on another site's behalf."""
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in OWN_FETCH_SITES:
        return False
    origin = headers.get("origin")
    if origin is None:
        return True
    scheme, separator, netloc = origin.strip().lower().partition("://")
    # The scheme is not compared: behind a TLS proxy the page is https while this hop is http.
    return bool(separator) and scheme in ("http", "https") and netloc == headers.get("host", "").strip().lower()


def session_value(token: str) -> str:
    """What the page's cookie holds: derived from the token, not the token, so that a cookie read
    from a browser's store is no API token (and the token is never written there)."""
    return hmac.new(token.encode(), b"reid-app page session", hashlib.sha256).hexdigest()


def _presented(headers: dict[str, str]) -> tuple[str | None, str | None]:
    """(the bearer token, the session cookie) a request carries."""
    authorization = headers.get("authorization", "")
    bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return bearer, value
    return bearer, None


def _same(offered: str | None, token: str) -> bool:
    """Constant-time comparison: response timing must not reveal how much of a guess was right."""
    return offered is not None and hmac.compare_digest(offered.encode(), token.encode())
