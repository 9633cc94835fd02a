"""``resnetlab serve``: an HTTP API and a web page over a :class:`~resnetlab.deploy.predictor.Predictor`.

Endpoints:

- ``POST /predict``: the file in multipart field ``file`` (or the raw file as the body, any other content type,
  with ``?filename=`` to name it). Query: ``top_k`` (default 5), ``explain=1`` to add the Grad-CAM picture as
  a base64 PNG data URL. Answers ``{"file", "top_k": [{"label", "prob"}], "heatmap"?, "batch_size",
  "timing_ms"}``; errors are ``{"error": message}`` with 400 (bad file, bad field, bad query), 411 (no
  length), 413 (too large), 503 (queue full), 504 (timed out).
- ``GET /health``: ``{"status": "ok", ...}`` with request and batch counters.
- ``GET /info``: modality, classes, input size, backend (the page reads it).
- ``GET /``: the page: drop or choose an image or audio file, or record from the microphone (the page
  encodes WAV itself: Chrome's MediaRecorder writes WebM/Opus, which libsndfile cannot read), and see the
  top-k bars and the heat map.

Batching: request threads decode their upload (decoders release the GIL) and queue the sample; one worker
thread takes the first waiting sample, gathers whatever else arrives within ``max_wait_ms`` up to
``max_batch``, and runs them as one batch; explanations run in the same thread after it (they need
gradients, on the fp32 model). The model is only ever called from that thread.

Why the standard library: four endpoints, and the work is in one worker thread, so an async framework would
buy nothing, while ``http.server.ThreadingHTTPServer`` costs no dependency. It is not hardened against
hostile clients the way a production server is (header sizes, many idle connections): bind it to localhost
(the default) or put a reverse proxy in front of it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import email.message
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from resnetlab.data.errors import DataError

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_MB = 16.0


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


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """``{field name: (file name or None, bytes)}`` from a ``multipart/form-data`` body (RFC 7578).

    A strict, small parser: ``cgi`` is deprecated (gone in Python 3.13), and ``email``'s parser may rewrite
    line endings inside binary parts. Raises ``RequestError(400)`` for a malformed body.
    """
    msg = email.message.Message()
    msg["content-type"] = content_type
    boundary = msg.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise RequestError(400, "multipart/form-data without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
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


class Handler(BaseHTTPRequestHandler):
    server: ResnetlabServer
    server_version = "resnetlab"
    protocol_version = "HTTP/1.1"  # keep-alive: a client's requests reuse its connection
    timeout = 30  # seconds a client may stall while sending (slow or dead clients free their thread)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    # --- responses -------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _error(self, err: RequestError) -> None:
        self._json(err.status, {"error": err.message, "status": err.status}, err.headers)

    # --- routes ----------------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                                   "media-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
                                                   "script-src 'self' 'unsafe-inline' blob:; worker-src blob:"})
        elif path == "/health":
            self._json(200, {"status": "ok", "model": self.server.predictor.meta.get("arch"),
                             "backend": self.server.predictor.backend,
                             "uptime_s": round(time.monotonic() - self.server.started, 1),
                             **self.server.batcher.stats()})
        elif path == "/info":
            self._json(200, {**self.server.predictor.info(), "max_upload_bytes": self.server.max_upload})
        else:
            self._error(RequestError(404, f"no such endpoint: GET {path} (try /, /health, /info, POST /predict)"))

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        try:
            if url.path != "/predict":
                raise RequestError(404, f"no such endpoint: POST {url.path} (try POST /predict)")
            self._json(200, self._predict(parse_qs(url.query, keep_blank_values=True)))
        except RequestError as e:
            if e.status in (411, 413):
                self.close_connection = True  # the unread body must not be taken for the next request
                e.headers = {**e.headers, "Connection": "close"}
            self._error(e)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked uploads are not accepted: send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a POST /predict needs a Content-Length header")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if n < 0:
            raise RequestError(400, f"bad Content-Length {length!r}")
        if n > self.server.max_upload:
            if n <= max(4 * self.server.max_upload, 32 * 2**20):
                self._discard(n)  # read it, so the client gets to read the answer (not a reset mid-upload)
            raise RequestError(413, f"upload too large: {n:,} bytes, limit {self.server.max_upload:,} "
                                    f"({self.server.max_upload / 2**20:g} MiB)")
        body = self.rfile.read(n)
        if len(body) != n:
            raise RequestError(400, f"body ended after {len(body):,} of {n:,} bytes")
        return body

    def _discard(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk:
                return
            n -= len(chunk)

    def _predict(self, query: dict) -> dict:
        pred = self.server.predictor
        unknown = sorted(set(query) - {"top_k", "explain", "filename"})
        if unknown:
            raise RequestError(400, f"unknown query parameter(s) {unknown}; known: top_k, explain, filename")
        try:
            top_k = int(query.get("top_k", [str(self.server.top_k)])[-1])
        except ValueError:
            raise RequestError(400, f"top_k must be an integer, got {query['top_k'][-1]!r}") from None
        if top_k < 1:
            raise RequestError(400, f"top_k must be >= 1, got {top_k}")
        explain = _flag(query["explain"][-1]) if "explain" in query else False
        t0 = time.perf_counter()
        body = self._read_body()
        ctype = self.headers.get("Content-Type", "application/octet-stream")
        if ctype.lower().startswith("multipart/form-data"):
            fields = parse_multipart(body, ctype)
            if "file" not in fields:
                have = ", ".join(repr(k) for k in fields) or "none"
                raise RequestError(400, f"no multipart field 'file' (fields sent: {have})")
            name, data = fields["file"]
        else:
            name, data = query.get("filename", [None])[-1], body
        name = _safe_name(name)
        try:
            sample = pred.decode_upload(data, name)
        except DataError as e:
            raise RequestError(400, str(e)) from None
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
        except Exception as e:  # noqa: BLE001 - the model failed: report it, keep serving
            raise RequestError(500, f"inference failed: {type(e).__name__}: {e}") from None
        t2 = time.perf_counter()
        return {"file": name, **result, "timing_ms": {"decode": round((t1 - t0) * 1000, 2),
                                                      "queue_and_model": round((t2 - t1) * 1000, 2)}}


class ResnetlabServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer holding the predictor, the batcher and the limits (see :func:`make_server`)."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, predictor, *, max_upload_bytes: int, max_batch: int, max_wait_ms: float,
                 max_queue: int, top_k: int, request_timeout: float, verbose: bool):
        super().__init__(address, Handler)
        self.predictor = predictor
        self.batcher = Batcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
        self.max_upload, self.top_k = int(max_upload_bytes), int(top_k)
        self.request_timeout, self.verbose = float(request_timeout), verbose
        self.page = (STATIC / "index.html").read_bytes()
        self.started = time.monotonic()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that went away or stalled: nothing to report
        super().handle_error(request, client_address)


def make_server(predictor, host: str = "127.0.0.1", port: int = 8000, *, max_upload_mb: float = MAX_UPLOAD_MB,
                max_batch: int = 16, max_wait_ms: float = 5.0, max_queue: int = 256, top_k: int = 5,
                request_timeout: float = 60.0, verbose: bool = False) -> ResnetlabServer:
    """A bound, not yet serving server (``port=0``: any free port; see ``server.url``). Run it with
    ``serve_forever()`` (in a thread if you like); stop with ``shutdown()`` then ``server_close()``."""
    if max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be > 0, got {max_upload_mb}")
    return ResnetlabServer((host, port), predictor, max_upload_bytes=int(max_upload_mb * 2**20),
                           max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, top_k=top_k,
                           request_timeout=request_timeout, verbose=verbose)


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

    predictor = Predictor.load(run_or_checkpoint, backend=backend, device=device, threads=threads, log=log)
    server = make_server(predictor, host, port, **options)
    info = predictor.info()
    log(f"serving {info['arch']} ({info['modality']}, {len(info['classes'])} classes, backend {predictor.backend}) "
        f"at {server.url}/  (POST /predict, GET /health; Ctrl-C stops)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log(f"warning: listening on {host}: anyone who can reach this address can use the model")
    _stop_on_signals()
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        log("stopping")
    finally:
        server.server_close()


__all__ = ["Batcher", "Handler", "RequestError", "ResnetlabServer", "make_server", "parse_multipart", "serve"]
