"""Storage that misbehaves, for tests: an HTTP proxy on 127.0.0.1 in front of the loopback S3
server that answers a share of the requests itself with what object stores do under load.

Point s3fs at it (``client_kwargs.endpoint_url = proxy.endpoint``) and give it rules. Each
request is read up to the end of its head (method, target, headers) and then, by the first rule
that picks it:

- ``503``: answered ``503 SlowDown`` with S3's XML error body (throttling);
- ``500``: answered ``500 InternalError``;
- ``drop``: the connection is closed without an answer;
- ``slow``: held ``slow_seconds`` before it goes on to the server;
- ``cut``: forwarded, but the connection is closed halfway through the answer's body;

and otherwise it is forwarded as it is, body bytes as they come, the answer piped back.
Every connection carries one request (``Connection: close`` both ways), so that every request
is seen and judged.

Which requests a rule picks is decided without a shared random stream: the n-th request for
the same method and target draws ``hash(seed, method, target, n)``, so the same job meets the
same faults whatever order its threads and actors send requests in. Rules can be swapped
while the proxy runs (faults off for a rerun), and the proxy counts what it did, per kind and
method, for tests to assert that the faults really happened.
"""

import hashlib
import re
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

KINDS = ("503", "500", "403", "drop", "slow", "cut")
_ANSWERS = {
    # Credentials the store does not know: what a wrong or revoked key gets.
    "403": ("403 Forbidden", "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."),
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": ("500 Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}
_HEAD_LIMIT = 64 * 1024


@dataclass(frozen=True)
class FaultRule:
    """Requests whose method is ``method`` (any when None) and whose target (path and query,
    URL-decoded) matches the regular expression ``target`` (any when None) get ``kind`` with
    probability ``share``, at most ``limit`` times (no limit when None)."""

    kind: str
    share: float = 1.0
    target: str | None = None
    method: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {self.share}")

    def matches(self, method: str, target: str) -> bool:
        return (self.method in (None, method)) and (self.target is None or re.search(self.target, target) is not None)


@dataclass(frozen=True)
class Injected:
    kind: str
    method: str
    target: str


class FaultProxy:
    """The proxy; ``with FaultProxy(upstream, rules) as proxy: ... proxy.endpoint ...``."""

    def __init__(self, upstream: str, rules: Sequence[FaultRule] = (), seed: int = 0, slow_seconds: float = 0.4):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.seed = seed
        self.slow_seconds = slow_seconds
        self._lock = threading.Lock()
        self._rules: list[FaultRule] = list(rules)
        self._fired: Counter[int] = Counter()  # rule index -> times it fired, for ``limit``
        self._seen: Counter[tuple[str, str]] = Counter()  # (method, target) -> requests so far
        self.injected: list[Injected] = []
        self.forwarded = 0
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.allow_reuse_address = True
        self._server.server_bind()
        self._server.server_activate()
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def set_rules(self, rules: Sequence[FaultRule]) -> None:
        with self._lock:
            self._rules = list(rules)
            self._fired.clear()

    def counts(self, method: str | None = None, target: str | None = None) -> Counter[str]:
        """Faults injected so far per kind, for requests of ``method`` whose target matches ``target``."""
        with self._lock:
            return Counter(i.kind for i in self.injected
                           if method in (None, i.method) and (target is None or re.search(target, i.target)))

    def requests(self, method: str | None = None, target: str | None = None) -> int:
        """Requests seen so far (faulted or not) of ``method`` whose target matches ``target``."""
        with self._lock:
            return sum(n for (m, t), n in self._seen.items() if method in (None, m) and (target is None or re.search(target, t)))

    # deciding ------------------------------------------------------------------------------

    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            seen = self._seen[(method, target)]
            self._seen[(method, target)] += 1
            digest = hashlib.sha256(f"{self.seed}\n{method}\n{target}\n{seen}".encode()).digest()
            draw = int.from_bytes(digest[:8], "big") / 2**64
            cumulative = 0.0
            for index, rule in enumerate(self._rules):
                if not rule.matches(method, target) or (rule.limit is not None and self._fired[index] >= rule.limit):
                    continue
                cumulative += rule.share
                if draw < cumulative:
                    self._fired[index] += 1
                    self.injected.append(Injected(rule.kind, method, target))
                    return rule.kind
            self.forwarded += 1
            return None

    # the wire ------------------------------------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        try:
            head, rest = _read_head(client)
            if head is None:
                return
            request_line, headers = _parse_head(head)
            method, target = request_line.split(" ")[:2]
            kind = self._decide(method, unquote(target))
            if kind == "drop":
                return  # closed below, with no answer
            if kind in _ANSWERS:
                if _header(headers, "expect").lower() != "100-continue":
                    _drain_body(client, headers, rest)  # so that the client reads our answer, not a reset
                _answer_error(client, *_ANSWERS[kind], target, with_body=method != "HEAD")
                return
            if kind == "slow":
                time.sleep(self.slow_seconds)
            self._forward(client, request_line, headers, rest, cut=kind == "cut")
        except OSError:
            pass  # the client went away: nothing to answer
        finally:
            _close(client)

    def _forward(self, client: socket.socket, request_line: str, headers: list[tuple[str, str]], rest: bytes, cut: bool) -> None:
        upstream = socket.create_connection(self.upstream, timeout=60)
        try:
            upstream.sendall(_build_head(request_line, _with_close(headers)) + rest)
            # The body (if any) goes on as the client sends it, while the answer comes back.
            body = threading.Thread(target=_pipe, args=(client, upstream), daemon=True)
            body.start()
            response_head, response_rest = _read_head(upstream)
            while response_head is not None and response_head.split(b" ", 2)[1].startswith(b"1"):
                # "100 Continue" (the client sent Expect: 100-continue): passed on as it is, the answer follows.
                client.sendall(response_head + b"\r\n\r\n")
                response_head, response_rest = _split_head(upstream, response_rest)
            if response_head is None:
                return
            status_line, response_headers = _parse_head(response_head)
            client.sendall(_build_head(status_line, _with_close(response_headers)))
            if cut:  # half the body, then nothing more: what a connection lost mid-transfer looks like
                _pipe(upstream, client, limit=int(_header(response_headers, "content-length") or 0) // 2, start=response_rest)
            else:
                _pipe(upstream, client, start=response_rest)  # the server closes after its answer (Connection: close)
        finally:
            _close(upstream)


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """The bytes up to the blank line that ends an HTTP head, and what came after them."""
    return _split_head(sock, b"")


def _split_head(sock: socket.socket, data: bytes) -> tuple[bytes | None, bytes]:
    """Like _read_head, for a head that may have begun in ``data`` already."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
        if len(data) > _HEAD_LIMIT:
            raise OSError("an HTTP head larger than 64 KiB")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((value for key, value in headers if key.lower() == name), "")


def _with_close(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive", "proxy-connection")]
    return [*kept, ("Connection", "close")]


def _build_head(first_line: str, headers: list[tuple[str, str]]) -> bytes:
    return ("\r\n".join([first_line, *(f"{k}: {v}" for k, v in headers)]) + "\r\n\r\n").encode("latin-1")


def _drain_body(sock: socket.socket, headers: list[tuple[str, str]], rest: bytes) -> None:
    """Reads the request's body off the socket (Content-Length or chunked) and drops it."""
    sock.settimeout(5)
    if _header(headers, "transfer-encoding").lower() == "chunked":
        data = rest
        while not re.search(rb"(^|\r\n)0(;[^\r\n]*)?\r\n(.*\r\n)?\r\n", data, re.DOTALL):  # the last chunk and trailers
            chunk = sock.recv(65536)
            if not chunk:
                return
            data = data[-4096:] + chunk
        return
    remaining = int(_header(headers, "content-length") or 0) - len(rest)
    while remaining > 0:
        chunk = sock.recv(min(remaining, 65536))
        if not chunk:
            return
        remaining -= len(chunk)


def _answer_error(sock: socket.socket, status: str, code: str, message: str, target: str, with_body: bool) -> None:
    resource = target.split("?", 1)[0]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>").encode()
    head = [("Content-Type", "application/xml"), ("Content-Length", str(len(body))), ("x-amz-request-id", "fault-proxy")]
    sock.sendall(_build_head(f"HTTP/1.1 {status}", _with_close(head)) + (body if with_body else b""))  # HEAD: no body


def _pipe(source: socket.socket, sink: socket.socket, limit: int | None = None, start: bytes = b"") -> None:
    """``start`` and then what ``source`` sends, to ``sink``, until ``source`` closes (or ``limit`` bytes)."""
    sent = 0
    try:
        chunk = start
        while True:
            if limit is not None:
                chunk = chunk[: limit - sent]
            if chunk:
                sink.sendall(chunk)
                sent += len(chunk)
            if limit is not None and sent >= limit:
                return
            chunk = source.recv(65536)
            if not chunk:
                return
    except OSError:
        pass  # either side closed: the exchange is over


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # also wakes a thread blocked reading it
    except OSError:
        pass
    sock.close()
