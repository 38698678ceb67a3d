"""Who may talk to the server, and how much they may send.

* Bound to a loopback address (the default, 127.0.0.1), only this machine can connect. The
  ``Host`` header must then name a loopback host too, so that a web page elsewhere that points
  a DNS name at 127.0.0.1 (DNS rebinding) cannot read the footage through the operator's browser.
* Bound to any other address, an access token is required (``$REID_APP_TOKEN`` or a file) and
  every request, page and API alike, must carry it: ``Authorization: Bearer TOKEN`` (API
  clients), or the ``reid_app_token`` cookie that the page sets when it is first opened as
  ``/?token=TOKEN`` (the token is then dropped from the address bar by a redirect). The cookie is
  HttpOnly and SameSite=Strict, so another site's page cannot make the browser send it. When a
  token is configured on a loopback address, it is checked there too.
* Request bodies are limited (``max_upload_bytes``): a larger ``Content-Length`` is refused before
  anything is read, and a body without one (chunked) is read up to the limit and refused beyond it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import stat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from reid_app.errors import ReidAppError

TOKEN_ENV = "REID_APP_TOKEN"
COOKIE = "reid_app_token"
#: Shorter tokens can be guessed: 16 characters of a password generator are ~95 bits.
MIN_TOKEN_LENGTH = 16
#: Characters that travel unchanged in a header, a cookie and a URL query.
TOKEN_PATTERN = re.compile(rf"[A-Za-z0-9._~-]{{{MIN_TOKEN_LENGTH},512}}")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
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
]


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

    def __init__(self, app: Any, *, token: str | None, loopback_only: bool, max_upload_bytes: int) -> None:
        self.app, self.token, self.loopback_only, self.max_upload_bytes = app, token, loopback_only, max_upload_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
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
                cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
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
            if not _same(_presented_token(headers), self.token):
                await refuse(
                    401,
                    "access token required: send `Authorization: Bearer TOKEN`, or open the page as /?token=TOKEN",
                    [(b"www-authenticate", b"Bearer")],
                )
                return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit() or int(length) > self.max_upload_bytes:
                    await refuse(413, self._too_large())
                    return
            else:
                body = await self._read_limited(receive)
                if body is None:
                    await refuse(413, self._too_large())
                    return
                receive = _replay(body)
        await self.app(scope, receive, send_with_headers)

    def _too_large(self) -> str:
        return f"request body too large: uploads are limited to {self.max_upload_bytes // (1 << 20)} MB"

    async def _read_limited(self, receive: Any) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_upload_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _host_is_loopback(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[: host.find("]") + 1] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return bool(host) and is_loopback(host)


def _presented_token(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def _same(offered: str | None, token: str) -> bool:
    """Constant-time comparison: response timing must not reveal how much of a guess was right."""
    return offered is not None and hmac.compare_digest(offered.encode(), token.encode())
