"""``resnetlab serve``: an HTTP API and a web page over a :class:`~resnetlab.deploy.predictor.Predictor`.

Endpoints:

- ``POST /predict``: the file in multipart field ``file`` (or the raw file as the body, any other content type,
  with ``?filename=`` to name it). Query: ``top_k`` (default 5), ``explain=1`` to add the Grad-CAM picture as
  a base64 PNG data URL. Answers ``{"file", "top_k": [{"label", "prob"}], "heatmap"?, "batch_size",
  "timing_ms"}``; errors are ``{"error": message, "status"}`` with 400 (bad file, bad field, bad query, bad
  framing), 403 (foreign Host or Origin), 408 (request not sent within the deadline), 411 (no length, or
  chunked), 413 (too large), 414/431 (request line/headers too large), 500 (unexpected error, details in the
  server's log), 503 (connections, decodes or queue full), 504 (timed out).
- ``GET /health``: ``{"status": "ok", ...}`` with request and batch counters.
- ``GET /info``: modality, classes, input size, backend (the page reads it).
- ``GET /``: the page: drop or choose an image or audio file, or record from the microphone (the page
  encodes WAV itself: Chrome's MediaRecorder writes WebM/Opus, which libsndfile cannot read), and see the
  top-k bars and the heat map.

Batching: each request's upload is decoded by one of ``max_decodes`` decoder threads (decoders release the
GIL), and the request thread queues the sample; one worker
thread takes the first waiting sample, gathers whatever else arrives within ``max_wait_ms`` up to
``max_batch``, and runs them as one batch; explanations run in the same thread after it (they need
gradients, on the fp32 model). The model is only ever called from that thread.

Limits against hostile clients (:class:`Limits`; each answer past one closes the connection):

- Connections: at most ``max_connections`` open at once, each served by its own thread (so threads are bounded
  too); one more is answered 503 from the accepting thread, without a thread, and closed.
- Time: a whole request (its line, headers and body) must arrive within ``request_deadline`` seconds from the
  moment the connection is ready for it, however slowly the bytes trickle in; past it the connection is cut
  (408 if the headers were complete). An idle keep-alive connection is closed after the same time.
- Size: the request line and headers together at most ``max_header_bytes`` (431); the body at most
  ``max_upload_bytes`` (413); at most ``max_parts`` multipart parts; images at most ``max_pixels`` pixels and
  audio at most ``max_audio_seconds``, both read from the file's header before decoding; at most
  ``max_decodes`` uploads decoded at once, by as many threads of their own (the others wait, up to the
  request timeout, then 503).
- Framing: one ``Content-Length`` of digits only; no ``Transfer-Encoding``. Any answer sent before the whole
  body was read closes the connection, so a body is never taken for the next request (request smuggling).
- Origin: a ``Host`` other than the bound address, ``localhost``, ``127.0.0.1`` or ``[::1]`` (with the port)
  or an ``allow_hosts`` entry is refused with 403 (DNS rebinding), and so is a POST whose ``Origin`` is present
  and not one of those hosts over http (cross-site request forgery). The page's own requests are same-origin.
- Errors: every unexpected exception while decoding or running the model is a JSON 500 with a generic
  message; the traceback goes to the server's log (stderr), never to the client.

Why the standard library: four endpoints, and the work is in one worker thread, so an async framework would
buy nothing, while ``http.server.ThreadingHTTPServer`` costs no dependency. Its threads are bounded by a
semaphore taken when a connection is accepted (a pool would leave accepted connections queued with nobody
reading them, which a stalling client turns into a wait for everyone); its timeouts by a deadline applied
to every read of a request. Still, for anything beyond this machine, put a reverse proxy in front of it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import email.message
import http.client
import io
import json
import os
import queue
import re
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from resnetlab.data.errors import DataError

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_MB = 16.0
_DIGITS = re.compile(r"[0-9]{1,18}")
# The page's policy; frame-ancestors 'none': no other site may frame it (clickjacking).
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self' 'unsafe-inline' blob:; worker-src blob:; frame-ancestors 'none'")


@dataclass(frozen=True)
class Limits:
    """The server's limits against hostile or broken clients (see the module docstring). Sizes in bytes,
    times in seconds. ``allow_hosts``: extra ``Host`` values accepted besides the bound address and the
    loopback names, each ``name`` (any port) or ``name:port``."""

    max_upload_bytes: int = int(MAX_UPLOAD_MB * 2**20)
    max_connections: int = 64
    request_deadline: float = 30.0
    max_header_bytes: int = 16 * 1024
    max_parts: int = 16
    max_decodes: int = 2
    max_pixels: int = 2**24  # 16.8 MP: a 4096x4096 image; the data layer's own cap (MAX_PIXELS) is 50 MP
    max_audio_seconds: float = 60.0
    allow_hosts: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_connections", "max_header_bytes", "max_parts", "max_decodes",
                     "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_deadline", "max_audio_seconds"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for entry in self.allow_hosts:
            if _split_host(entry) is None:
                raise ValueError(f"--allow-host {entry!r}: expected NAME or NAME:PORT")


class RequestError(Exception):
    """An HTTP error to send as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class _Job:
    sample: object
    explain: bool
    top_k: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Groups samples queued by concurrent requests into batches for one worker thread.

    ``submit`` returns a Future of ``{"top_k", "batch_size", "heatmap"?}``. The worker waits for a first
    sample, then at most ``max_wait_ms`` for more, up to ``max_batch``. At most ``max_queue`` samples wait;
    beyond that ``submit`` raises ``queue.Full`` (the server answers 503).
    """

    def __init__(self, predictor, *, max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, max_queue >= 1; got {max_batch}, "
                             f"{max_wait_ms}, {max_queue}")
        self.predictor = predictor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue(max_queue)
        self._stats_lock = threading.Lock()
        self.requests = 0
        self.batches = 0
        self.batch_sizes: dict[int, int] = {}
        self.errors = 0
        self._thread = threading.Thread(target=self._loop, name="resnetlab-batcher", daemon=True)
        self._thread.start()

    def submit(self, sample, *, explain: bool = False, top_k: int = 5) -> concurrent.futures.Future:
        job = _Job(sample, explain, top_k)
        self._queue.put_nowait(job)
        return job.future

    def stats(self) -> dict:
        with self._stats_lock:
            mean = self.requests / self.batches if self.batches else 0.0
            return {"requests": self.requests, "batches": self.batches, "mean_batch": round(mean, 2),
                    "batch_sizes": dict(sorted(self.batch_sizes.items())), "errors": self.errors,
                    "queued": self._queue.qsize()}

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, deadline = [first], time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                probs = self.predictor.probabilities([j.sample for j in jobs])
                results = [{"top_k": tops, "batch_size": len(jobs)}
                           for tops in self.predictor.top_k(probs, max(j.top_k for j in jobs))]
                for job, res in zip(jobs, results):
                    res["top_k"] = res["top_k"][:job.top_k]
                    if job.explain:
                        png = self.predictor.heatmap_png(job.sample)
                        res["heatmap"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                    job.future.set_result(res)
                with self._stats_lock:
                    self.requests += len(jobs)
                    self.batches += 1
                    self.batch_sizes[len(jobs)] = self.batch_sizes.get(len(jobs), 0) + 1
            except Exception as e:  # noqa: BLE001 - every waiting request must get an answer
                with self._stats_lock:
                    self.errors += len(jobs)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)


def parse_multipart(body: bytes, content_type: str, max_parts: int = Limits.max_parts
                    ) -> dict[str, tuple[str | None, bytes]]:
    """``{field name: (file name or None, bytes)}`` from a ``multipart/form-data`` body (RFC 7578).

    A strict, small parser: ``cgi`` is deprecated (gone in Python 3.13), and ``email``'s parser may rewrite
    line endings inside binary parts. Raises ``RequestError(400)`` for a malformed body and for one of more
    than ``max_parts`` parts (counted before any is parsed: thousands of tiny parts cost seconds of CPU).
    """
    msg = email.message.Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise RequestError(400, "multipart/form-data without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    if body.count(delimiter) > max_parts + 1:
        raise RequestError(400, f"too many multipart parts: more than {max_parts}")
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise RequestError(400, "malformed multipart body: no closing boundary")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise RequestError(400, "malformed multipart body: a boundary is not on its own line")
        head, sep, content = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise RequestError(400, "malformed multipart body: a part has no header/content separator")
        part = email.message.Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                part[name.strip()] = value.strip()
        if part.get("content-disposition") is None:
            raise RequestError(400, "malformed multipart body: a part has no Content-Disposition")
        field_name = part.get_param("name", header="content-disposition")
        if isinstance(field_name, str):
            fields[field_name] = (part.get_filename(), content)
    return fields


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on", ""):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise RequestError(400, f"explain must be 0 or 1, got {value!r}")


def _safe_name(name: str | None) -> str:
    name = os.path.basename((name or "").replace("\\", "/")).strip() or "upload"
    return "".join(c for c in name if c.isprintable())[:200] or "upload"


class _DeadlineIO(socket.SocketIO):
    """The reading side of a connection, each read waiting at most until the handler's ``deadline``: the time
    limit holds for the whole request, so a client sending a byte at a time cannot hold its thread longer."""

    def __init__(self, sock: socket.socket, handler: Handler):
        super().__init__(sock, "rb")
        self._handler = handler

    def readinto(self, b) -> int | None:
        left = self._handler.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self._sock.settimeout(left)
        return super().readinto(b)


class _HeaderBudget:
    """Stands in for ``rfile`` while the stdlib parses the headers (it reads them with ``readline`` only) and
    counts their bytes; past the budget, the stdlib answers the ``HTTPException`` with 431."""

    def __init__(self, rfile, budget: int, limit: int):
        self._rfile, self.left, self.limit = rfile, budget, limit

    def readline(self, size: int = -1) -> bytes:
        cap = self.left + 1 if size < 0 else min(size, self.left + 1)
        line = self._rfile.readline(max(cap, 0))
        self.left -= len(line)
        if self.left < 0:
            raise http.client.HTTPException(f"request line and headers larger than {self.limit:,} bytes")
        return line


def _split_host(value: str, default_port: int = 80) -> tuple[str, int] | None:
    """``(name, port)`` of a ``Host`` value (``name``, ``name:port``, ``[v6]:port``), or None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        name, _, port = value.partition(":")
    if not name or (port and not _DIGITS.fullmatch(port)):
        return None
    return name, int(port) if port else default_port


class Handler(BaseHTTPRequestHandler):
    server: ResnetlabServer
    server_version = "resnetlab"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse its connection
    timeout = None  # reads: the per-request deadline (_DeadlineIO); writes: set in _send
    deadline = 0.0
    content_length: int | None = None
    _body_pending = False  # body bytes the client sent (or may send) that were not read: close after answering
    _gated = False
    _responded = False

    def setup(self) -> None:
        super().setup()
        plain, self.rfile = self.rfile, io.BufferedReader(_DeadlineIO(self.connection, self))
        plain.close()  # unread: nothing is lost, and the socket is not held open by a second reader

    def handle_one_request(self) -> None:
        # The deadline starts when the connection is ready for a request: an idle keep-alive connection is
        # closed after the same time.
        self.deadline = time.monotonic() + self.server.limits.request_deadline
        self.content_length, self._body_pending, self._gated, self._responded = None, False, False, False
        self.raw_requestline = b""
        super().handle_one_request()  # closes the connection on a TimeoutError, without an answer
        if self.raw_requestline and not self._responded and time.monotonic() >= self.deadline:
            # the deadline passed while the headers trickled in: say so before closing (an idle connection,
            # with no request line, is closed without a word)
            try:
                self.command, self.request_version = "", "HTTP/1.1"
                self.send_error(408, f"the request did not arrive within {self.server.limits.request_deadline:g} s")
            except OSError:
                pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    # --- checks before any route ---------------------------------------------------------------------------

    def parse_request(self) -> bool:
        limit = self.server.limits.max_header_bytes
        if len(self.raw_requestline) > limit:
            self.command, self.request_version, self.requestline = "", "", ""
            self.send_error(414, f"request line longer than {limit:,} bytes")
            return False
        if len(self.raw_requestline.split()) == 2:  # refused before the stdlib waits for headers it would ignore
            self.command, self.request_version = "", "HTTP/1.0"
            self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
            self.send_error(400, "HTTP/0.9 requests are not served; send HTTP/1.0 or HTTP/1.1")
            return False
        plain = self.rfile
        self.rfile = _HeaderBudget(plain, limit - len(self.raw_requestline), limit)
        try:
            ok = super().parse_request()  # runs handle_expect_100 (below) when the client asks for it
        finally:
            self.rfile = plain
        return ok and (self._gated or self._gate())

    def handle_expect_100(self) -> bool:
        # Checked before "100 Continue", so a refused client is not invited to send its body.
        return self._gate() and super().handle_expect_100()

    def _gate(self) -> bool:
        """The checks every request passes before its method runs: version, body framing, Host and (for a POST)
        Origin. Sends the error and returns False for a refused request."""
        self._gated = True
        try:
            self._check_framing()
            self._check_host_and_origin()
        except RequestError as e:
            self.close_connection = True  # a refused client gets no second try on this connection
            self._error(e)
            return False
        return True

    def _check_framing(self) -> None:
        lengths = self.headers.get_all("Content-Length") or []
        encodings = self.headers.get_all("Transfer-Encoding") or []
        self._body_pending = bool(lengths or encodings)  # until the body is known empty or has been read
        if self.request_version == "HTTP/0.9":
            raise RequestError(400, "HTTP/0.9 requests are not served; send HTTP/1.0 or HTTP/1.1")
        if encodings:
            raise RequestError(411, "Transfer-Encoding (chunked uploads) is not accepted: send a Content-Length")
        if len(lengths) > 1:
            raise RequestError(400, f"{len(lengths)} Content-Length headers; send one")
        if lengths:
            value = lengths[0].strip(" \t")
            if not _DIGITS.fullmatch(value):  # int() would take "+5", "1_0", " 5", "٥"
                raise RequestError(400, f"bad Content-Length {value[:40]!r}: digits only")
            self.content_length = int(value)
            self._body_pending = self.content_length > 0

    def _check_host_and_origin(self) -> None:
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            raise RequestError(400, "a request needs exactly one Host header")
        if not self.server.host_allowed(hosts[0]):
            raise RequestError(403, f"Host {hosts[0][:100]!r} is not served here; start the server with "
                                    f"--allow-host NAME to accept it")
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin is not None and not self.server.origin_allowed(origin):
            raise RequestError(403, f"cross-site POST refused: Origin {origin[:100]!r} is not this server")

    # --- responses -------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # every answer has a status line, even to an HTTP/0.9 request
        headers = dict(headers or {})
        if self._body_pending:
            self.close_connection = True  # the unread body must not be taken for the next request
        if self.close_connection:
            headers["Connection"] = "close"
        self._responded = True
        self.connection.settimeout(self.server.limits.request_deadline)  # a client that does not read its answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, err: RequestError) -> None:
        self._json(err.status, {"error": err.message, "status": err.status}, err.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's errors (malformed request line or headers, unknown method) as JSON; they close."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        text = explain or message or self.responses.get(code, ("error",))[0]
        self._json(code, {"error": text, "status": code})

    def _internal(self, what: str) -> RequestError:
        """Logs the exception being handled with its traceback; the client gets a message without details."""
        self.server.log_exception(f"{what} ({self.command} {self.path[:200]} from {self.client_address[0]})")
        return RequestError(500, f"internal error while {what}; the server's log has the details")

    # --- routes ----------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        try:
            self._get(urlsplit(self.path).path)
        except RequestError as e:
            self._error(e)
        except Exception:  # noqa: BLE001 - a generic 500, the details in the log
            if self._responded:
                raise
            self._error(self._internal("answering a GET"))

    def _get(self, path: str) -> None:
        if path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY"})
        elif path == "/health":
            self._json(200, {"status": "ok", "model": self.server.predictor.meta.get("arch"),
                             "backend": self.server.predictor.backend,
                             "uptime_s": round(time.monotonic() - self.server.started, 1),
                             **self.server.batcher.stats(), **self.server.connection_stats()})
        elif path == "/info":
            self._json(200, {**self.server.predictor.info(), "max_upload_bytes": self.server.limits.max_upload_bytes})
        else:
            raise RequestError(404, f"no such endpoint: GET {path[:200]} (try /, /health, /info, POST /predict)")

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        try:
            if url.path != "/predict":
                raise RequestError(404, f"no such endpoint: POST {url.path[:200]} (try POST /predict)")
            self._json(200, self._predict(parse_qs(url.query, keep_blank_values=True)))
        except RequestError as e:
            self._error(e)
        except Exception:  # noqa: BLE001 - a generic 500, the details in the log
            if self._responded:
                raise
            self._error(self._internal("handling the upload"))

    def _read_body(self) -> bytes:
        limits = self.server.limits
        n = self.content_length
        if n is None:
            raise RequestError(411, "a POST /predict needs a Content-Length header")
        if n > limits.max_upload_bytes:
            if n <= max(4 * limits.max_upload_bytes, 32 * 2**20):
                self._discard(n)  # read it, so the client gets to read the answer (not a reset mid-upload)
            raise RequestError(413, f"upload too large: {n:,} bytes, limit {limits.max_upload_bytes:,} "
                                    f"({limits.max_upload_bytes / 2**20:g} MiB)")
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise RequestError(408, f"the request did not arrive within {limits.request_deadline:g} s") from None
        if len(body) != n:
            raise RequestError(400, f"body ended after {len(body):,} of {n:,} bytes")
        self._body_pending = False
        return body

    def _discard(self, n: int) -> None:
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 1 << 16))
                if not chunk:
                    return
                n -= len(chunk)
        except TimeoutError:
            return

    def _predict(self, query: dict) -> dict:
        pred, limits = self.server.predictor, self.server.limits
        unknown = sorted(set(query) - {"top_k", "explain", "filename"})
        if unknown:
            raise RequestError(400, f"unknown query parameter(s) {[u[:40] for u in unknown[:5]]}; known: top_k, "
                                    "explain, filename")
        try:
            top_k = int(query.get("top_k", [str(self.server.top_k)])[-1])
        except ValueError:
            raise RequestError(400, f"top_k must be an integer, got {query['top_k'][-1][:40]!r}") from None
        if top_k < 1:
            raise RequestError(400, f"top_k must be >= 1, got {top_k}")
        explain = _flag(query["explain"][-1]) if "explain" in query else False
        t0 = time.perf_counter()
        body = self._read_body()
        ctype = self.headers.get("Content-Type", "application/octet-stream")
        if ctype.lower().startswith("multipart/form-data"):
            fields = parse_multipart(body, ctype, limits.max_parts)
            if "file" not in fields:
                names = [repr(k[:40]) for k in fields]
                have = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") or "none"
                raise RequestError(400, f"no multipart field 'file' (fields sent: {have})")
            name, data = fields["file"]
        else:
            name, data = query.get("filename", [None])[-1], body
        name = _safe_name(name)
        job = self.server.decoder.submit(pred.decode_upload, data, name, max_pixels=limits.max_pixels,
                                         max_seconds=limits.max_audio_seconds)
        try:
            sample = job.result(timeout=self.server.request_timeout)
        except concurrent.futures.TimeoutError:
            job.cancel()  # still queued: never decoded; already running: finishes, unread
            raise RequestError(503, "server busy decoding other uploads; retry shortly", {"Retry-After": "1"}) from None
        except DataError as e:
            raise RequestError(400, str(e)) from None
        except Exception:  # noqa: BLE001 - MemoryError, a decoder's ValueError...: a generic 500, details logged
            raise self._internal("decoding the upload") from None
        t1 = time.perf_counter()
        try:
            future = self.server.batcher.submit(sample, explain=explain, top_k=top_k)
        except queue.Full:
            raise RequestError(503, "server busy: too many requests waiting; retry shortly",
                               {"Retry-After": "1"}) from None
        try:
            result = future.result(timeout=self.server.request_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestError(504, f"no answer within {self.server.request_timeout:g} s") from None
        except Exception:  # noqa: BLE001 - the model failed: report it (without its details), keep serving
            raise self._internal("running the model") from None
        t2 = time.perf_counter()
        return {"file": name, **result, "timing_ms": {"decode": round((t1 - t0) * 1000, 2),
                                                      "queue_and_model": round((t2 - t1) * 1000, 2)}}


class ResnetlabServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the predictor, the batcher and the :class:`Limits` (see
    :func:`make_server`). One thread per connection, at most ``limits.max_connections`` of them."""

    daemon_threads = True
    block_on_close = False  # server_close() does not wait for stalled clients (each is cut at its deadline)
    request_queue_size = 128

    def __init__(self, address, predictor, *, limits: Limits, max_batch: int, max_wait_ms: float, max_queue: int,
                 top_k: int, request_timeout: float, verbose: bool):
        super().__init__(address, Handler)
        self.predictor = predictor
        self.batcher = Batcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
        self.limits, self.top_k = limits, int(top_k)
        self.request_timeout, self.verbose = float(request_timeout), verbose
        self.page = (STATIC / "index.html").read_bytes()
        self.started = time.monotonic()
        # Uploads are decoded by max_decodes threads of their own, not by the connection threads: that bounds
        # the decodes in flight, and the memory the allocator keeps after them (glibc gives each thread that
        # allocates an arena of its own, up to 8 per core, and keeps their freed memory: decoding in up to 64
        # connection threads let the peak RSS of 16 uploads of 16.8 MP grow by 1.4 GiB; with the pool, 0.7).
        self.decoder = concurrent.futures.ThreadPoolExecutor(limits.max_decodes, "resnetlab-decode")
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._stats_lock = threading.Lock()
        self._open = self._refused = 0
        self._hosts = self._allowed_hosts()
        body = json.dumps({"error": f"server busy: {limits.max_connections} connections open; retry shortly",
                           "status": 503}).encode()
        self._busy = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\nRetry-After: 1\r\nConnection: close\r\n\r\n" + body)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    # --- connections: one thread each, at most limits.max_connections -------------------------------------

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        with self._stats_lock:
            self._open += 1
        try:
            threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name="resnetlab-connection", daemon=True).start()
        except BaseException:
            self._closed_one()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one()

    def _closed_one(self) -> None:
        with self._stats_lock:
            self._open -= 1
        self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 and close, from the accepting thread: non-blocking, so a client that reads nothing costs nothing."""
        with self._stats_lock:
            self._refused += 1
        try:
            request.setblocking(False)
            try:  # what the client has sent already: closing with it unread would reset the connection
                request.recv(1 << 16)
            except OSError:
                pass
            request.send(self._busy)
        except OSError:
            pass
        self.shutdown_request(request)

    def connection_stats(self) -> dict:
        with self._stats_lock:
            return {"open_connections": self._open, "max_connections": self.limits.max_connections,
                    "refused_connections": self._refused}

    # --- Host and Origin ----------------------------------------------------------------------------------

    def _allowed_hosts(self) -> set[tuple[str, int | None]]:
        host, port = self.server_address[:2]
        allowed: set[tuple[str, int | None]] = {(h, port) for h in ("localhost", "127.0.0.1", "::1", host.lower())}
        for entry in self.limits.allow_hosts:  # checked by Limits
            name, entry_port = _split_host(entry, default_port=-1)
            allowed.add((name, None if entry_port == -1 else entry_port))
        return allowed

    def host_allowed(self, value: str, default_port: int = 80) -> bool:
        """Whether a ``Host`` (or an Origin's host) names this server: DNS rebinding sends a foreign name."""
        parsed = _split_host(value, default_port)
        return parsed is not None and (parsed in self._hosts or (parsed[0], None) in self._hosts)

    def origin_allowed(self, origin: str) -> bool:
        scheme, _, netloc = origin.strip().partition("://")
        if scheme.lower() not in ("http", "https") or not netloc or "/" in netloc or "@" in netloc:
            return False  # "null" (sandboxed frames, files), or not an origin at all
        return self.host_allowed(netloc, 443 if scheme.lower() == "https" else 80)

    # --- errors -------------------------------------------------------------------------------------------

    def log_exception(self, what: str) -> None:
        """The exception being handled, with its traceback, to the server's log (stderr)."""
        sys.stderr.write(f"resnetlab serve: unexpected error while {what}:\n{traceback.format_exc()}")
        sys.stderr.flush()

    def server_close(self) -> None:
        super().server_close()
        self.decoder.shutdown(wait=False, cancel_futures=True)
        self.batcher.close()

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away or stalled: nothing to report
        super().handle_error(request, client_address)


def make_server(predictor, host: str = "127.0.0.1", port: int = 8000, *, max_upload_mb: float = MAX_UPLOAD_MB,
                max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256, top_k: int = 5,
                request_timeout: float = 60.0, verbose: bool = False, **limits) -> ResnetlabServer:
    """A bound, not yet serving server (``port=0``: any free port; see ``server.url``). Run it with
    ``serve_forever()`` (in a thread if you like); stop with ``shutdown()`` then ``server_close()``.

    ``request_timeout``: seconds a request waits for a decode slot and for its answer from the model.
    ``limits``: the fields of :class:`Limits` other than ``max_upload_bytes`` (given as ``max_upload_mb``)."""
    return ResnetlabServer((host, port), predictor, limits=_limits(max_upload_mb, **limits), max_batch=max_batch,
                           max_wait_ms=max_wait_ms, max_queue=max_queue, top_k=top_k,
                           request_timeout=request_timeout, verbose=verbose)


def _limits(max_upload_mb: float = MAX_UPLOAD_MB, **limits) -> Limits:
    if max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    if "allow_hosts" in limits:
        limits["allow_hosts"] = tuple(limits["allow_hosts"] or ())
    return Limits(max_upload_bytes=int(max_upload_mb * 2**20), **limits)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (process managers, ``kill``) both stop the server cleanly, even when the parent
    started it with SIGINT ignored (background jobs of non-interactive shells inherit that)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def serve(run_or_checkpoint: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
          backend: str = "auto", device: str = "auto", threads: int | None = None, log=print, **options) -> None:
    """Load a run's model and serve it until interrupted (Ctrl-C). ``options`` go to :func:`make_server`."""
    from resnetlab.deploy.predictor import Predictor

    _limits(**{k: v for k, v in options.items() if k in Limits.__dataclass_fields__ or k == "max_upload_mb"})
    predictor = Predictor.load(run_or_checkpoint, backend=backend, device=device, threads=threads, log=log)
    server = make_server(predictor, host, port, **options)
    info = predictor.info()
    log(f"serving {info['arch']} ({info['modality']}, {len(info['classes'])} classes, backend {predictor.backend}) "
        f"at {server.url}/  (POST /predict, GET /health; Ctrl-C stops)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host}: anyone who can reach this address can use the model")
        if host in ("0.0.0.0", "::", ""):
            log("note: requests are accepted with Host localhost, 127.0.0.1 or [::1] only; name this machine's "
                "address or name with --allow-host to reach it from elsewhere")
    _stop_on_signals()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        log("stopping")
    finally:
        server.server_close()


__all__ = ["Batcher", "Handler", "RequestError", "ResnetlabServer", "make_server", "parse_multipart", "serve"]
