"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto's server in the tests).

Real object stores fail now and then: 500 InternalError, 503 SlowDown under load, connections
reset, responses cut short. `FaultProxy` reproduces these on 127.0.0.1 so that a test can show
that the pipeline's retries (botocore's and s3fs's) absorb them and that the results are the
same bytes as without faults. Stdlib only: a ThreadingHTTPServer (one thread per client
connection, HTTP/1.1 keep-alive) forwarding with http.client.

Which requests fail is drawn from a seeded RNG, so a single-threaded client sees the same faults
on every run; with concurrent clients the interleaving (and so which request gets which fault)
varies, the rate does not.

Faults and what the upstream sees:

- ``500``: an ``InternalError`` XML body; the request is NOT forwarded.
- ``503``: S3's ``SlowDown`` XML body; NOT forwarded.
- ``reset``: the connection is closed with SO_LINGER 0 (a TCP RST) and no response; NOT forwarded.
- ``truncated``: forwarded (so a PUT did happen), then the real status, headers and full
  Content-Length go back with only half of the body before the connection closes. Only
  responses with a body of 2+ bytes can be cut; others pass unharmed and are not counted.

So 500/503/reset never cause a double write. A PUT's response has no body, so ``truncated`` hits
reads, listings and POSTs (DeleteObjects, multipart): a retry repeats them, which is harmless.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("500", "503", "reset", "truncated")
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
        "proxy-connection", "proxy-authorization", "content-length"}
_ERRORS = {"500": (500, "InternalError", "We encountered an internal error. Please try again."),
           "503": (503, "SlowDown", "Please reduce your request rate.")}


class _Handler(BaseHTTPRequestHandler):
    """One client connection: each request is read whole, then failed or forwarded."""

    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    server: _Server
    _up: http.client.HTTPConnection | None = None

    def log_message(self, *args: Any) -> None:  # quiet: the counts say what happened
        pass

    def _body(self) -> bytes:
        """The request body; a chunked one is de-chunked (it is forwarded with a Content-Length)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers, then the blank line
                pass
            return b"".join(parts)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}  # Host kept: it is signed
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in (0, 1):  # a kept-alive upstream connection may have been closed by the server
            if self._up is None:
                self._up = http.client.HTTPConnection(*self.server.upstream, timeout=60)
            try:
                self._up.request(self.command, self.path, body=body, headers=headers)
                resp = self._up.getresponse()
                data = resp.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self._up.close()
                self._up = None
                if attempt:
                    raise
        out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
        if self.command == "HEAD" and resp.getheader("Content-Length") is not None:
            out.append(("Content-Length", resp.getheader("Content-Length")))
        elif self.command != "HEAD":
            out.append(("Content-Length", str(len(data))))
        return resp.status, resp.reason, out, data

    def _handle(self) -> None:
        body = self._body()
        kind = self.server.draw()
        if kind in _ERRORS:
            status, code, message = _ERRORS[kind]
            data = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                    f"</Message><RequestId>faultproxy</RequestId></Error>").encode()
            self.server.count(kind)  # counted before the client can see it
            self._respond(status, "", [("Content-Type", "application/xml"), ("Content-Length", str(len(data)))],
                          data)
            return
        if kind == "reset":
            self.server.count(kind)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # RST: no response at all
            self.close_connection = True
            return
        status, reason, headers, data = self._forward(body)
        self.server.count("forwarded")
        if kind == "truncated" and self.command != "HEAD" and len(data) >= 2:
            self.server.count(kind)
            self._respond(status, reason, headers, data[:len(data) // 2])  # headers still say the full length
            self.close_connection = True  # a FIN after the partial body
            return
        self._respond(status, reason, headers, data)

    def _respond(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response_only(status, reason or None)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def finish(self) -> None:
        if self._up is not None:
            self._up.close()
        try:
            super().finish()
        except OSError:  # the socket was reset on purpose
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], rate: float, faults: Mapping[str, float], seed: int) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream, self.rate = upstream, rate
        self.kinds, self.weights = list(faults), list(faults.values())
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def draw(self) -> str | None:
        """Count a request and draw its fault (None: pass it through)."""
        with self.lock:
            self.counts["requests"] += 1
            if self.rng.random() < self.rate:
                return self.rng.choices(self.kinds, self.weights)[0]
            return None

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1
            if key in FAULTS:
                self.counts["failed"] += 1


class FaultProxy:
    """A fault-injecting proxy for an S3 endpoint; `storage_options` are the upstream's, pointed at it.

    `rate` is the fraction of requests that fail, `faults` the kinds (equal weights) or a mapping
    kind -> weight. `counts` has "requests" (all received), "forwarded" (sent upstream), "failed"
    and one entry per fault kind. rate=0 makes a pass-through proxy that only counts requests.
    """

    def __init__(self, upstream_options: Mapping[str, Any], rate: float = 0.1,
                 faults: Sequence[str] | Mapping[str, float] = FAULTS, seed: int = 0) -> None:
        weights = dict(faults) if isinstance(faults, Mapping) else dict.fromkeys(faults, 1.0)
        unknown = set(weights) - set(FAULTS)
        if unknown or not weights:
            raise ValueError(f"faults must be a non-empty selection of {FAULTS}, got {sorted(weights)}")
        self._options = dict(upstream_options)
        up = urlsplit(self._options["endpoint_url"])
        if up.scheme != "http":
            raise ValueError("FaultProxy forwards plain http only (a local test endpoint)")
        self._args = ((up.hostname, up.port or 80), rate, weights, seed)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.endpoint_url = ""

    def start(self) -> FaultProxy:
        self._server = _Server(*self._args)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy")
        self._thread.start()
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    @property
    def counts(self) -> dict[str, int]:
        """A snapshot of the request and fault counters."""
        if self._server is None:
            return {}
        with self._server.lock:
            return {"requests": 0, "forwarded": 0, "failed": 0, **dict.fromkeys(self._args[2], 0),
                    **self._server.counts}

    @property
    def storage_options(self) -> dict[str, Any]:
        return {**self._options, "endpoint_url": self.endpoint_url}

    def stop(self) -> None:
        """Stop serving; `counts` keep their final values."""
        if self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
