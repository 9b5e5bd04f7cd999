"""The dashboard's HTTP server: one page, its vendored static files, and JSON endpoints
(``/api/health``, ``/api/counters``, ``/api/certs``, ``/api/market``), and the brokers'
``$SYS`` figures as Prometheus text (``/metrics/brokers/<name>``). GET only."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Final, Protocol

from .certs import cert_expiry
from .counters import counters
from .health import HealthProbe
from .topology import TopologyFile

__all__ = ["DashboardServer", "MarketSource"]

log = logging.getLogger(__name__)

_STATIC: Final = {"index.html": "text/html; charset=utf-8",
                  "dashboard.js": "text/javascript; charset=utf-8",
                  "charts.js": "text/javascript; charset=utf-8",
                  "dashboard.css": "text/css; charset=utf-8"}
# Everything the page loads comes from this server: no CDN, no inline script.
_CSP: Final = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


class MarketSource(Protocol):
    """Where the market view comes from (live aggregates, or a market store)."""

    def snapshot(self) -> dict[str, Any]: ...


def _static(name: str) -> bytes:
    return resources.files("pear_mqtt.dashboard").joinpath("static", name).read_bytes()


class DashboardServer:
    """Serves ``topology`` on ``host:port`` (0: any free port) from a thread pool."""

    def __init__(self, topology: TopologyFile, market: MarketSource, *, host: str = "127.0.0.1",
                 port: int = 0,
                 broker_metrics: Callable[[str], bytes | None] | None = None) -> None:
        health = HealthProbe(topology)
        self._broker_metrics = broker_metrics
        self._routes: dict[str, Callable[[], dict[str, Any]]] = {
            "/api/health": health.snapshot,
            "/api/counters": lambda: counters(topology.current()),
            "/api/certs": lambda: cert_expiry(topology.current()),
            "/api/market": market.snapshot,
        }
        self._httpd = ThreadingHTTPServer((host, port), self._handler())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def serve_forever(self) -> None:
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> None:
        """Serve from a background thread (tests, embedding)."""
        self._thread = threading.Thread(target=self.serve_forever, name="pear-dashboard",
                                        daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop serving (from another thread than :meth:`serve_forever`'s) and close."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        routes = self._routes
        broker_metrics = self._broker_metrics

        class Handler(BaseHTTPRequestHandler):
            server_version = "pear-dashboard"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

            def _send(self, status: HTTPStatus, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Security-Policy", _CSP)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status: HTTPStatus, data: Any) -> None:
                self._send(status, json.dumps(data).encode(), "application/json")

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/":
                    path = "/static/index.html"
                if path == "/favicon.ico":
                    self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
                    return
                route = routes.get(path)
                if route is not None:
                    try:
                        data = route()
                    except Exception as exc:  # one failing view must not take the page down
                        log.exception("dashboard %s failed", path)
                        self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                   {"error": f"{type(exc).__name__}: {exc}"})
                        return
                    self._json(HTTPStatus.OK, data)
                    return
                broker = path.removeprefix("/metrics/brokers/")
                if broker != path and broker_metrics is not None:
                    text = broker_metrics(broker)
                    if text is not None:
                        self._send(HTTPStatus.OK, text,
                                   "text/plain; version=0.0.4; charset=utf-8")
                        return
                name = path.removeprefix("/static/")
                if path.startswith("/static/") and name in _STATIC:
                    self._send(HTTPStatus.OK, _static(name), _STATIC[name])
                    return
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {path}"})

            do_HEAD = do_GET

            def _refuse(self) -> None:
                self._json(HTTPStatus.METHOD_NOT_ALLOWED,
                           {"error": "the dashboard is read-only: GET only"})

            do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

        return Handler
