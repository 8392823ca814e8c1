"""The CAS's HTTPS front end (aiohttp): routing, limits, client identity and error mapping.

Service calls block on the database, so they run in a thread pool; the event loop only
parses requests and TLS. Every refusal is a JSON ``{"error": reason}`` with a 4xx status;
an unexpected failure is logged with its traceback and answered with a bare 500.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from enclavify.cas.audit import HEAD_FILE, HeadFile
from enclavify.cas.masterkey import MasterKey, master_key_path
from enclavify.cas.openapi import SPEC
from enclavify.cas.paths import database_url
from enclavify.cas.pki import ServerPki, client_key_hash, ensure_server_pki, server_ssl_context
from enclavify.cas.service import CasService
from enclavify.cas.storage import Database
from enclavify.errors import CasError, CasRejected

log = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVICE_KEY = web.AppKey("service", CasService)
EXECUTOR_KEY = web.AppKey("executor", ThreadPoolExecutor)
CA_PEM_KEY = web.AppKey("ca_pem", bytes)


@dataclass
class CasSetup:
    """Everything a CAS process opens at start: PKI, database, master key, service."""

    pki: ServerPki
    created: bool
    database: Database
    service: CasService


def open_cas(
    data_dir: Path, *, db: str | None = None, sans: tuple[str, ...] = (),
    nonce_lifetime: float = 60.0,
) -> CasSetup:
    """Prepare the data directory (CA, server certificate, master key) and the database."""
    pki, created = ensure_server_pki(data_dir, sans)
    master_key = MasterKey.load_or_create(master_key_path(data_dir))
    database = Database.open(database_url(data_dir, db))
    database.migrate()
    service = CasService(
        database, master_key, HeadFile(data_dir / HEAD_FILE), nonce_lifetime=nonce_lifetime
    )
    return CasSetup(pki, created, database, service)


def _client_hash(request: web.Request) -> str | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return _hash_certificate(der) if der else None


@functools.lru_cache(maxsize=1024)
def _hash_certificate(der: bytes) -> str:
    return client_key_hash(der)


async def _call(request: web.Request, function: Callable[..., T], *args: Any) -> T:
    executor = request.app[EXECUTOR_KEY]
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(function, *args))


def _answer(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=json.dumps)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CasRejected as error:
        return _answer({"error": str(error)}, error.status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        reason = error.reason
        if error.status == 413:
            reason = f"request body larger than {MAX_BODY} bytes"
        return _answer({"error": reason}, error.status)
    except CasError:
        log.exception("CAS failure on %s %s", request.method, request.path)
        return _answer({"error": "internal error: the CAS could not complete the request"}, 503)
    except Exception:
        log.exception("unexpected failure on %s %s", request.method, request.path)
        return _answer({"error": "internal error"}, 500)


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=request.content_length)
    return await request.read()


async def _read_json(request: web.Request, *, optional: bool = False) -> Any:
    body = await _read_body(request)
    if optional and not body.strip():
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise CasRejected(f"request body is not valid JSON: {error}", 400) from error


async def submit_session(request: web.Request) -> web.Response:
    body = await _read_body(request)
    service = request.app[SERVICE_KEY]
    return _answer(await _call(request, service.submit_session, body, _client_hash(request)))


async def get_session(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    name = request.match_info["name"]
    return _answer(await _call(request, service.get_session, name, _client_hash(request)))


async def session_history(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    name = request.match_info["name"]
    return _answer(await _call(request, service.session_history, name, _client_hash(request)))


async def public_values(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    return _answer(await _call(request, service.public_values, request.match_info["name"]))


async def challenge(request: web.Request) -> web.Response:
    body = await _read_json(request, optional=True)
    if not isinstance(body, dict) or body:
        raise CasRejected("a challenge request takes an empty JSON object", 400)
    service = request.app[SERVICE_KEY]
    return _answer(await _call(request, service.challenge))


async def attest(request: web.Request) -> web.Response:
    body = await _read_json(request)
    service = request.app[SERVICE_KEY]
    return _answer(await _call(request, service.attest, body, _client_hash(request)))


async def ca_certificate(request: web.Request) -> web.Response:
    return web.Response(body=request.app[CA_PEM_KEY], content_type="application/x-pem-file")


async def openapi(request: web.Request) -> web.Response:
    return _answer(SPEC)


ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("POST", "/v1/sessions", submit_session),
    # The history route comes first, so a path ending in "/history" returns the history.
    # NOTE: a session whose last name component is "history" cannot be read by its own path.
    ("GET", "/v1/sessions/{name:.+}/history", session_history),
    ("GET", "/v1/sessions/{name:.+}", get_session),
    ("GET", "/v1/values/session={name:.+}", public_values),
    ("POST", "/v1/attest/challenge", challenge),
    ("POST", "/v1/attest", attest),
    ("GET", "/v1/ca-certificate", ca_certificate),
    ("GET", "/v1/openapi.json", openapi),
)


def build_app(service: CasService, ca_pem: bytes, *, workers: int = 16) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app[SERVICE_KEY] = service
    app[CA_PEM_KEY] = ca_pem
    app[EXECUTOR_KEY] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cas")
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)

    async def shutdown(app: web.Application) -> None:
        app[EXECUTOR_KEY].shutdown(wait=True)

    app.on_cleanup.append(shutdown)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise CasError(f"invalid listen address {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(
    setup: CasSetup,
    listen: str,
    *,
    on_ready: Callable[[str], None] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; ``on_ready`` gets the bound ``host:port``."""
    host, port = parse_listen(listen)
    app = build_app(setup.service, setup.pki.ca_pem())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(
        runner, host, port, ssl_context=ssl_context or server_ssl_context(setup.pki),
        backlog=1024,
    )
    try:
        await site.start()
    except OSError as error:
        await runner.cleanup()
        raise CasError(f"cannot listen on {listen}: {error}") from error
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname() if sockets else (host, port)
    address = f"{host}:{bound[1]}" if ":" not in host else f"[{host}]:{bound[1]}"
    log.info("CAS listening on https://%s", address)
    if on_ready is not None:
        on_ready(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("CAS on https://%s stopping", address)
    finally:
        await runner.cleanup()
        setup.database.close()
