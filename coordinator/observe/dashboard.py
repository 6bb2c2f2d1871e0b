"""The coordinator's observers: a live dashboard and Prometheus ``/metrics`` served from the coordinator
process, and TensorBoard event files, all fed by the coordinator's progress events.

The web server is aiohttp's, on the coordinator's own event loop: the page is read-only and small
(one HTML file, one script, one style sheet, shipped in the package; the charts are SVG drawn by the
script, no CDN), and the live updates are server-sent events, which need nothing but a long HTTP
response. An ASGI stack (starlette and uvicorn) would add a second server and its loop policy for no
gain. aiohttp also gives the tests a WebSocket client for the browser's DevTools protocol.

Routes: ``/`` the page, ``/static/...`` its files, ``/events`` the stream (an ``event: state`` with the
whole :meth:`FleetView.snapshot` each time it changed, at most :data:`MAX_PUSHES_PER_S` a second, and a
comment every :data:`HEARTBEAT_S` to keep proxies from closing it), ``/api/state`` one snapshot, and
``/metrics`` in Prometheus' text format. With a token, every route wants it, as ``?token=`` or an
``Authorization: Bearer`` header.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from splitft.coordinator.observe.fleet import FleetView
from splitft.coordinator.observe.metrics import JobMetrics
from splitft.coordinator.observe.tensorboard import TensorBoardLog
from splitft.coordinator.progress import Event, Progress
from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
MAX_PUSHES_PER_S = 5.0
HEARTBEAT_S = 15.0
#: ``local``'s dashboard when none is asked for: if this port is taken, a free one is used instead
LOCAL_DEFAULT = "127.0.0.1:8765"


@dataclass(frozen=True)
class Address:
    host: str
    port: int  # 0: any free port
    fallback: bool = False  # a default: if the port is taken, take any free one

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"


def parse_address(text: str, option: str = "--dashboard", *, fallback: bool = False) -> Address | None:
    """``[HOST:]PORT`` (HOST defaults to 127.0.0.1), or ``off``; a ConfigError names what is wrong."""
    text = text.strip()
    if text.lower() in ("off", "no", "none", ""):
        return None
    host, sep, port_text = text.rpartition(":")
    host = (host if sep else "127.0.0.1").strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{option} must be [HOST:]PORT or off, e.g. 8765 or 0.0.0.0:8765; got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{option}: port {port} is not between 0 and 65535")
    return Address(host, port, fallback)


class Observatory:
    """What watches one job. Pass it to the coordinator as its ``progress`` (it forwards every event to
    ``forward``, e.g. the console view), and run the job inside ``async with observatory:``, which binds
    the dashboard first: a port in use fails there, before anything else starts."""

    def __init__(
        self,
        job: JobConfig,
        *,
        dashboard: Address | None = None,
        token: str | None = None,
        tensorboard: Path | None = None,
        forward: Progress | None = None,
    ) -> None:
        self.view = FleetView(job)
        self.metrics = JobMetrics(job.job)
        self.address = dashboard
        self.token = token or None
        self.tensorboard = TensorBoardLog(tensorboard, job.job) if tensorboard is not None else None
        self.forward = forward
        self.url: str | None = None  # once bound
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._waiters: set[asyncio.Event] = set()  # one per open event stream
        self._encoded: tuple[int, bytes] = (-1, b"")
        self._encoded_at = 0.0
        self._failures: set[str] = set()  # the observers that failed (each is logged once)
        self._observers: list[tuple[str, Progress]] = [
            ("dashboard", self.view.update),
            ("metrics", self.metrics.update),
        ]
        if self.tensorboard is not None:
            self._observers.append(("tensorboard", self.tensorboard.update))
        self._stopping = False
        self.pushes = 0  # snapshots sent to pages, all clients
        self.busy_s = 0.0  # time the coordinator's loop spent on observers: events, encoding, /metrics

    # ------------------------------------------------------------------ events

    def __call__(self, event: Event, data: dict[str, Any]) -> None:
        if self.forward is not None:
            self.forward(event, data)
        started = time.perf_counter()
        for name, update in self._observers:
            try:
                update(event, data)
            except Exception:  # an observer must never stop the job (e.g. a full disk under the TensorBoard log)
                if name not in self._failures:
                    self._failures.add(name)
                    log.exception("the %s observer failed on a %r event; the job goes on", name, event)
        if self._loop is not None:
            if threading.get_ident() == self._loop_thread:
                self._wake()
            else:
                self._loop.call_soon_threadsafe(self._wake)
        self.busy_s += time.perf_counter() - started

    def _wake(self) -> None:
        for waiter in self._waiters:
            waiter.set()

    def failed(self, error: BaseException) -> None:
        """The job ended with an error: the page says so (it is pushed before the server stops)."""
        self(Event.FAILED, {"error": f"{type(error).__name__}: {error}"})

    # ------------------------------------------------------------------ the server

    async def __aenter__(self) -> Observatory:
        self._loop, self._loop_thread = asyncio.get_running_loop(), threading.get_ident()
        if self.address is not None:
            await self._serve(self.address)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        error = exc_info[1]
        if isinstance(error, Exception) and self.view.status not in ("done", "failed"):
            self.failed(error)
        await self.stop()

    async def _serve(self, address: Address) -> None:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/", self._index)
        app.router.add_get("/events", self._events)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_static("/static/", STATIC)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        port = address.port
        try:
            site = web.TCPSite(runner, address.host, port, reuse_address=False)
            try:
                await site.start()
            except OSError as exc:
                if not address.fallback:
                    raise
                log.info("dashboard: %s:%d is taken (%s); using a free port", address.host, port, exc.strerror)
                site = web.TCPSite(runner, address.host, 0)
                await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"--dashboard {address.host}:{address.port}: cannot listen there ({exc.strerror or exc}); "
                "give another port, or off"
            ) from exc
        self._runner = runner
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[1] if sockets else port
        host = socket.gethostname() if address.host in ("0.0.0.0", "::", "") else address.host
        shown = host if ":" not in host else f"[{host}]"
        self.url = f"http://{shown}:{bound}/" + (
            f"?token={urllib.parse.quote(self.token, safe='')}" if self.token else ""
        )
        if not address.loopback and self.token is None:
            log.warning("the dashboard listens on %s without a token: anyone who can reach it can read it", shown)

    async def stop(self) -> None:
        self._stopping = True
        self._wake()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await asyncio.sleep(0.25)  # the last push (done, or failed) reaches the pages
            await runner.cleanup()

    # ------------------------------------------------------------------ handlers

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # The page's script and style sheet are the package's own files, the same for everyone: they carry no
        # data of the job, and the browser fetches them without the page's ?token=.
        if self.token is not None and not request.path.startswith("/static/"):
            given = request.query.get("token", "")
            scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer":
                given = credentials.strip()
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                raise web.HTTPUnauthorized(
                    text="this dashboard wants its token: ?token=... or Authorization: Bearer ...",
                    headers={"WWW-Authenticate": 'Bearer realm="splitft"'},
                )
        response = await handler(request)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    def _snapshot(self) -> tuple[int, bytes]:
        """(version, JSON) of the view: made again at most :data:`MAX_PUSHES_PER_S` times a second, however
        many pages are open and however fast events come (a flood of refused messages bumps the version)."""
        version, encoded = self._encoded
        now = time.monotonic()
        if version != self.view.version and now - self._encoded_at >= 1 / MAX_PUSHES_PER_S:
            started = time.perf_counter()
            version, encoded = self.view.version, json.dumps(self.view.snapshot(), separators=(",", ":")).encode()
            self._encoded, self._encoded_at = (version, encoded), now
            self.busy_s += time.perf_counter() - started
        return version, encoded

    async def _state(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self._snapshot()[1], content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        response = web.Response(body=self.metrics.exposition())
        self.busy_s += time.perf_counter() - started
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
        await response.prepare(request)
        changed = asyncio.Event()
        self._waiters.add(changed)
        sent = -1
        try:
            while True:
                if self.view.version != sent:
                    version, encoded = self._snapshot()
                    if version != sent:
                        sent = version
                        await response.write(b"event: state\ndata: " + encoded + b"\n\n")
                        self.pushes += 1
                if self._stopping and sent == self.view.version:
                    break
                await asyncio.sleep(1 / MAX_PUSHES_PER_S)  # pushes are coalesced: one per interval at most
                changed.clear()
                if self.view.version == sent and not self._stopping:
                    try:
                        await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
                    except TimeoutError:
                        await response.write(b": heartbeat\n\n")
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._waiters.discard(changed)
        return response
