"""``reid-app serve``: the web page and the HTTP API (see :mod:`reid_app.server`)."""

from __future__ import annotations

import errno
import socket
import sys

import typer

from reid_app.backends import BACKEND_HELP, INT8_HELP
from reid_app.commands.ingest import warn
from reid_app.config import DB_URL_ENV, DEFAULT_DB_URL, PUBLIC_URL_ENV, AppConfig
from reid_app.errors import ReidAppError
from reid_app.server.security import TOKEN_ENV, is_loopback, load_token, require_token_for

#: Default upload limit: a 48-megapixel JPEG is ~15 MB.
DEFAULT_MAX_UPLOAD_MB = 20


def serve_command(
    db: str | None = typer.Option(
        None, "--db", help=f"SQLAlchemy database URL (default: {DEFAULT_DB_URL}, or ${DB_URL_ENV})."
    ),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder of the thumbnails (default: next to the DB)."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help=f"Address to listen on; anything but loopback needs a token (${TOKEN_ENV})."
    ),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port)."),
    token_file: str | None = typer.Option(
        None, "--token-file", help=f"File holding the access token (else ${TOKEN_ENV}); mode 600."
    ),
    max_upload_mb: int = typer.Option(DEFAULT_MAX_UPLOAD_MB, "--max-upload-mb", help="Largest accepted request body."),
    detector: str | None = typer.Option(None, "--detector", help="Person detector (as for ingest)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda:0, ..."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    int8: bool = typer.Option(False, "--int8", help=INT8_HELP),
    weights: str | None = typer.Option(None, "--weights", help="FA-Net weights (must be those of the database)."),
    public_url: str = typer.Option(
        "", "--public-url", help=f"Address operators reach this server at, for the thumbnail links of watchlist alerts "
        f"(or ${PUBLIC_URL_ENV}; default: http://HOST:PORT as bound)."
    ),  # fmt: skip
) -> None:
    """Serve the search page and the HTTP API (/api/v1) over the database."""
    if not 0 <= port <= 65535:
        raise ReidAppError(f"--port must be between 0 and 65535, got {port}")
    if not 1 <= max_upload_mb <= 1024:
        raise ReidAppError(f"--max-upload-mb must be between 1 and 1024, got {max_upload_mb}")
    token = load_token(token_file)
    require_token_for(host, token)
    config = AppConfig.from_env(
        db, data_dir, weights=weights, device=device, backend=backend, int8=int8, public_url=public_url
    )
    if not config.public_url and port:  # alerts link thumbnails here from the first delivery round on
        config.public_url = own_url(host, port)
    if config.is_sqlite and config.sqlite_path is None:
        # Each connection of an in-memory database is a database of its own, and an empty one.
        raise ReidAppError("serve needs a database file or server in --db, not an in-memory SQLite database")
    from reid_app.server.limits import max_connections, raise_fd_limit, uvicorn_config

    connections = max_connections(raise_fd_limit())
    warn(low_fd_limit_warning(connections))
    check_port_free(host, port)
    # Heavy imports after the cheap checks: a bad flag answers at once.
    import uvicorn

    from reid_app.server.app import create_app
    from reid_app.server.state import ServerState

    state = ServerState.load(
        config,
        detector_weights=detector,
        token=token,
        loopback_only=is_loopback(host) and token is None,
        max_upload_bytes=max_upload_mb << 20,
    )
    warn(state.embedder.warning())
    app = create_app(state)
    server = uvicorn.Server(uvicorn_config(app, host, port, connections_allowed=connections))
    shown = f"[{host}]" if ":" in host else host

    original_startup = server.startup

    async def startup(sockets=None) -> None:  # noqa: ANN001 - uvicorn's own signature
        await original_startup(sockets)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        if not config.public_url:  # --port 0: the bound port is known only now
            app.state.deliverer.base_url = own_url(host, bound)
        hint = " (first visit: add ?token=YOUR_TOKEN)" if token else ""
        print(f"reid-app serving {config.safe_db_url} on http://{shown}:{bound}/{hint}", file=sys.stderr, flush=True)

    server.startup = startup  # type: ignore[method-assign]
    server.run()


def own_url(host: str, port: int) -> str:
    """This server's own URL: the machine's name when it listens on every address."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before the models load (~20 s), not after."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as exc:
        reason = "it is in use by another program" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ReidAppError(f"cannot listen on {host} port {port}: {reason} (choose another --port)") from None


def low_fd_limit_warning(connections: int) -> str | None:
    """A line for the operator when the file-descriptor limit leaves room for few connections: a
    handful of slow clients (or browser tabs, each holding several) would then take them all."""
    from reid_app.server.limits import FD_RESERVE, FEW_CONNECTIONS  # noqa: PLC0415 (after the cheap checks)

    if connections >= FEW_CONNECTIONS:
        return None
    return (
        f"the file-descriptor limit allows only {connections} open connections (after {FD_RESERVE} kept for the "
        f"database, models and uploads): raise it (`ulimit -n 4096`, or LimitNOFILE= in a systemd unit)"
    )


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
