"""A fault-injecting HTTP proxy in front of a real S3 endpoint (moto's server), on 127.0.0.1:
every request is forwarded unchanged unless ``fault(method, path)`` says otherwise. The faults
are real network behaviour a client sees from a store: an HTTP error status, a request that
is never answered, a body that trickles in a byte at a time."""
from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Fault:
    kind: str  # "status" (answer with `status`), "hang" (never answer), "trickle" (a byte every `every_s`)
    status: int = 500
    every_s: float = 1.0


class S3Proxy:
    """``with S3Proxy(endpoint, fault) as proxy:`` point AWS_ENDPOINT_URL at ``proxy.endpoint``.
    ``seen``: (method, path) of every request; ``hit``: set when a fault was first served."""

    def __init__(self, upstream: str, fault: Callable[[str, str], Fault | None]) -> None:
        self.upstream = urlsplit(upstream)
        self.fault = fault
        self.seen: list[tuple[str, str]] = []
        self.hit = threading.Event()
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen.append((self.command, self.path))
                fault = proxy.fault(self.command, self.path)
                if fault is not None:
                    proxy.hit.set()
                    return proxy._serve_fault(self, fault)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream.netloc
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _serve_fault(self, handler: BaseHTTPRequestHandler, fault: Fault) -> None:
        if fault.kind == "status":
            body = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            handler.send_response(fault.status)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        elif fault.kind == "hang":
            self._stop.wait()
        elif fault.kind == "trickle":
            handler.send_response(200 if handler.command != "GET" or "Range" not in handler.headers else 206)
            handler.send_header("Content-Length", str(1 << 20))
            handler.end_headers()
            while not self._stop.is_set():
                try:
                    handler.wfile.write(b"x")
                    handler.wfile.flush()
                except OSError:
                    return
                time.sleep(fault.every_s)
        handler.close_connection = True

    def __enter__(self) -> S3Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
