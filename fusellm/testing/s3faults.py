"""A fault-injecting HTTP proxy in front of an S3 endpoint, for the object-store fault tests.

It listens on 127.0.0.1, forwards every request to the real (test) server, and answers the
requests a `Fault` matches with what a flaky object store does: a connection dropped half-way
through a download or an upload, 500 InternalError, 503 ServiceUnavailable, 503 SlowDown, a
response that comes too late, or a body with a flipped byte. Every request is recorded with the
fault it got, so a test can tell that a retry really happened.

    with FaultyS3Proxy("http://127.0.0.1:5000") as proxy:
        proxy.inject(Fault("drop-response", method="GET", key="models/a/", times=2))
        ...  # point FUSELLM_S3_ENDPOINT_URL at proxy.url
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import unquote, urlsplit

from fusellm.settings import LOCALHOST

KINDS = ("drop-response", "drop-request", "500", "503", "slowdown", "slow", "corrupt")
ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "upgrade"}


@dataclass
class Fault:
    """Answer the next `times` requests matching `method` and `key` (a substring of the object
    key, "" for any) with `kind`; `times=None` for every one of them."""

    kind: str
    method: str = "GET"
    key: str = ""
    times: int | None = 1
    delay: float = 2.0  # for "slow": seconds before the answer starts
    hits: int = field(default=0, init=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {', '.join(KINDS)}")

    def take(self, method: str, key: str) -> bool:
        if method != self.method or self.key not in key:
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


@dataclass(frozen=True)
class Request:
    method: str
    key: str  # bucket/key, unquoted, without the query
    query: str
    fault: str | None


class FaultyS3Proxy:
    """The proxy; a context manager that starts it on a free 127.0.0.1 port and stops it."""

    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOCALHOST, 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://{LOCALHOST}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def inject(self, *faults: Fault) -> None:
        """Replace the faults in force (and forget the requests seen so far)."""
        with self._lock:
            self.faults = list(faults)
            self.requests = []

    def fault_for(self, method: str, path: str, query: str) -> str | None:
        key = unquote(path).lstrip("/")
        with self._lock:
            kind = next((f.kind for f in self.faults if f.take(method, key)), None)
            self.requests.append(Request(method, key, query, kind))
        return kind

    def delay_of(self, kind: str) -> float:
        return next((f.delay for f in self.faults if f.kind == kind), 0.0)

    def count(self, method: str, key: str = "", fault: str | None = "any") -> int:
        """Requests seen for `method` and `key` (substring), with `fault` ("any": whatever)."""
        return sum(
            1
            for r in self.requests
            if r.method == method and key in r.key and (fault == "any" or r.fault == fault)
        )


def _handler_for(proxy: FaultyS3Proxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass  # the proxy's record is `proxy.requests`

        def _handle(self):
            try:
                self._answer()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting: as it should

        def _answer(self):
            path, _, query = self.path.partition("?")
            kind = proxy.fault_for(self.command, path, query)
            if kind == "drop-request":
                self._read_body(half=True)
                return self._drop()
            body = self._read_body()
            if kind in ERRORS:
                return self._error(*ERRORS[kind])
            if kind == "slow":
                time.sleep(proxy.delay_of("slow"))
            status, reason, headers, payload = self._forward(body)
            if kind == "corrupt" and payload:
                payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
            self.send_response(status, reason)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            if kind == "drop-response" and payload:
                self.wfile.write(payload[: len(payload) // 2])
                return self._drop()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        def _read_body(self, half: bool = False) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return b"" if half else self._read_chunked()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length // 2 if half else length)

        def _read_chunked(self) -> bytes:
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()

        def _forward(self, body: bytes):
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
            try:
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
                }
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
                if self.command != "HEAD":
                    kept = [(k, v) for k, v in kept if k.lower() != "content-length"]
                    kept.append(("Content-Length", str(len(payload))))
                return resp.status, resp.reason, kept, payload
            finally:
                conn.close()

        def _error(self, status: int, code: str, message: str):
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            ).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _drop(self):
            """Cut the connection without a (complete) answer, as a dying server does."""
            self.close_connection = True
            self.wfile.flush()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler


# ---------------------------------------------------------------------------------------------
# Random trials (benchmarks/fault_injection.py --s3 N)

ATTEMPTS = 3  # what the trials set FUSELLM_S3_MAX_ATTEMPTS to
DOWNLOAD_FAULTS = ("drop-response", "500", "503", "slowdown", "slow", "corrupt")
UPLOAD_FAULTS = ("drop-request", "500", "503", "slowdown")


def random_fault(rng, op: str) -> Fault:
    """A fault for a download ("GET") or an upload ("PUT"): of a big multipart object
    ("big.bin"), of the manifest, or of any request; met once, twice or every time."""
    kind = rng.choice(DOWNLOAD_FAULTS if op == "GET" else UPLOAD_FAULTS)
    # A flipped byte models damaged object data; listings and headers are not checksummed.
    key = "big.bin" if kind == "corrupt" else rng.choice(["big.bin", "fusellm-manifest.json", ""])
    return Fault(kind, op, key=key, times=rng.choice([1, 2, None]), delay=4.0)


def should_recover(fault: Fault) -> bool:
    """Whether the client must get past `fault`: a damaged body is downloaded twice at most,
    anything else is retried up to ATTEMPTS times."""
    if fault.times is None:
        return False
    return fault.times < (2 if fault.kind == "corrupt" else ATTEMPTS)


def trial_problem(proxy: FaultyS3Proxy, fault: Fault, folder, uri: str, scratch) -> str | None:
    """Upload `folder` to `uri` (or download it, published beforehand) through `proxy` under
    `fault`; what went wrong, or None. A trial passes when a recoverable fault was recovered
    from with identical bytes, and an unrecoverable one raised a SourceError naming the S3
    folder while leaving no partial file and no folder taken for complete."""
    from pathlib import Path

    from fusellm.io.s3 import MANIFEST, fetch_s3, list_s3, upload_dir
    from fusellm.io.uris import SourceError, parse_uri

    folder, scratch = Path(folder), Path(scratch)
    mirror = scratch / "mirror"
    if fault.method == "GET":
        proxy.inject()
        upload_dir(folder, uri)
    proxy.inject(fault)
    try:
        if fault.method == "GET":
            fetch_s3(parse_uri(uri), mirror, require_manifest=True)
        else:
            upload_dir(folder, uri)
        error = None
    except SourceError as err:
        error = str(err)
    proxy.inject()
    if error is not None and uri not in error:
        return f"the error does not name {uri}: {error}"
    if error is not None and should_recover(fault):
        return f"not recovered from a transient fault: {error}"
    if error is None and fault.times is None and proxy.count(fault.method, fault.key, fault.kind):
        return "a fault met on every attempt went unnoticed"
    if list(scratch.rglob("*.partial")):
        return "a partial download was left behind"
    if fault.method == "PUT" and error is None:
        fetch_s3(parse_uri(uri), mirror, require_manifest=True)
    if error is None and not _same_files(folder, mirror, skip=(MANIFEST, ".fusellm-fetch.json")):
        return "the copy differs from the original"
    if error is not None and fault.method == "PUT":
        try:
            list_s3(parse_uri(uri), require_manifest=True)
            return "a failed upload reads as complete"
        except SourceError:
            pass
    return None


def _same_files(a, b, skip: tuple[str, ...]) -> bool:
    def files(root):
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and p.name not in skip
        )

    return files(a) == files(b) and all((a / n).read_bytes() == (b / n).read_bytes()
                                        for n in files(a))  # fmt: skip
