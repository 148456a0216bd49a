"""A fault-injecting HTTP proxy for tests: put it in front of the moto S3 server and it fails chosen
requests the way object stores do (503 SlowDown, 500 InternalError, a dropped connection, 403 on a
write), passing everything else through unchanged.

Why our own: moto has no fault injection for its server mode, and the behaviour under test is the
client's (the AWS SDK's retries inside pyarrow, our error rows), so the faults must arrive over a real
socket. The proxy binds 127.0.0.1 on a free port, runs in a thread of the test process, and is told
what to fail by a ``policy``: a function of (method, path) returning None (pass through) or a fault
name. It counts what it saw and what it injected, for the tests' assertions and figures.
"""
from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import urlsplit

Policy = Callable[[str, str], Optional[str]]
FAULTS = ("503", "500", "reset", "403")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_BODIES = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}


@dataclass
class Counts:
    requests: Counter = field(default_factory=Counter)  # by method
    faults: Counter = field(default_factory=Counter)  # by fault name
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": dict(self.requests), "faults": dict(self.faults)}


def random_read_faults(rate: float, seed: int, faults: tuple[str, ...] = ("503", "500", "reset")) -> Policy:
    """Fail this fraction of reads (GET and HEAD), each with one of `faults`, reproducibly."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def policy(method: str, path: str) -> str | None:
        if method not in ("GET", "HEAD"):
            return None
        with lock:
            return rng.choice(faults) if rng.random() < rate else None

    return policy


def first_n_reads_fail(n: int, fault: str = "503") -> Policy:
    """Fail the first `n` reads, then pass everything: more than the SDK's default retries."""
    left = [n]
    lock = threading.Lock()

    def policy(method: str, path: str) -> str | None:
        with lock:
            if method in ("GET", "HEAD") and left[0] > 0:
                left[0] -= 1
                return fault
        return None

    return policy


class FaultProxy:
    """``with FaultProxy(upstream, policy) as proxy: proxy.endpoint``. ``policy`` may be swapped while
    it runs (``proxy.policy = ...``)."""

    def __init__(self, upstream: str, policy: Policy | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.policy: Policy = policy or (lambda method, path: None)
        self.counts = Counts()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fault-proxy")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK expects

    def _relay(self) -> None:
        owner = self.owner
        body = self._read_body()
        with owner.counts.lock:
            owner.counts.requests[self.command] += 1
        fault = owner.policy(self.command, self.path)
        if fault is not None:
            with owner.counts.lock:
                owner.counts.faults[fault] += 1
            return self._inject(fault)
        conn = http.client.HTTPConnection(*owner.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
            self.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            declared = answer.getheader("Content-Length")
            self.send_header("Content-Length", declared if self.command == "HEAD" and declared else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _inject(self, fault: str) -> None:
        if fault == "reset":  # the connection drops before any answer
            self.close_connection = True
            self.connection.shutdown(2)
            return
        status, code, message = _BODIES[fault]
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay  # noqa: N815 - http.server's naming

    def log_message(self, *args) -> None:  # quiet
        pass
