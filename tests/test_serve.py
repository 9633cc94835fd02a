"""The HTTP server: endpoints, errors, limits, batching; and end to end in a headless Chromium (slow).

Servers listen on 127.0.0.1 on a free port, in a thread of the test process; every request has a timeout.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import re
import select
import socket
import threading
import time
import uuid

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from deploy_helpers import make_run, write_image, write_wave
from resnetlab.deploy.predictor import Predictor
from resnetlab.deploy.serve import Batcher, RequestError, make_server, parse_multipart

CHROMIUM = "/usr/bin/chromium"
TIMEOUT = 60


def multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, (filename, data) in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disp}\r\nContent-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Client:
    def __init__(self, server):
        self.host, self.port = server.server_address[:2]

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            ctype = r.getheader("Content-Type", "")
            return r.status, (json.loads(data) if ctype.startswith("application/json") else data)
        finally:
            conn.close()

    def predict(self, data: bytes, filename="x.png", query="", field="file"):
        body, ctype = multipart({field: (filename, data)})
        return self.request("POST", f"/predict{query}", body, {"Content-Type": ctype})


def running(predictor, **options):
    server = make_server(predictor, "127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("serve-img") / "run", num_classes=3)
    server, thread = running(Predictor.load(run, backend="eager", device="cpu"), max_upload_mb=0.5,
                             max_wait_ms=20)
    yield server
    stop(server, thread)


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("serve-aud") / "run", "res8", modality="audio")
    server, thread = running(Predictor.load(run, backend="eager", device="cpu"))
    yield server
    stop(server, thread)


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("png") / "digit.png", 30).read_bytes()


# --- multipart -------------------------------------------------------------------------------------------


def test_parse_multipart_keeps_binary_bytes():
    payload = bytes(range(256)) * 8 + b"\r\n--not-the-boundary\r\n\r\n" + b"\n\r\x00"
    body, ctype = multipart({"note": (None, b"hi"), "file": ('we"ird.png', payload)})
    fields = parse_multipart(body, ctype)
    assert fields["file"][1] == payload and fields["note"] == (None, b"hi")
    assert fields["file"][0].startswith("we")  # a quote inside a quoted filename: browsers escape it as %22


@pytest.mark.parametrize("body,ctype,message", [
    (b"--b\r\n\r\nx\r\n--b--\r\n", "multipart/form-data", "without a boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nxyz", "multipart/form-data; boundary=b",
     "no closing boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\nxyz\r\n--b--\r\n", "multipart/form-data; boundary=b",
     "no header/content separator"),
])
def test_parse_multipart_rejects_malformed(body, ctype, message):
    with pytest.raises(RequestError, match=message) as e:
        parse_multipart(body, ctype)
    assert e.value.status == 400


# --- the image server ------------------------------------------------------------------------------------


def test_health_info_and_page(image_server):
    c = Client(image_server)
    status, health = c.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "resnet20"
    status, info = c.request("GET", "/info")
    assert status == 200 and info["classes"] == ["c0", "c1", "c2"] and info["image_size"] == [16, 16]
    assert info["max_upload_bytes"] == 2**19
    assert {"GIF", "TIFF"} <= set(info["formats"]) and {".gif", ".tif", ".tiff"} <= set(info["extensions"])
    status, page = c.request("GET", "/")
    assert status == 200 and b'id="file"' in page and b'id="heatmap"' in page
    assert b"info.formats" in page and b"info.extensions" in page  # the page lists what the server accepts
    status, err = c.request("GET", "/nope")
    assert status == 404 and "no such endpoint" in err["error"]


def test_predict_image(image_server, png):
    status, res = Client(image_server).predict(png, "../../etc/digit.png", "?top_k=2")
    assert status == 200, res
    assert res["file"] == "digit.png"  # only the base name is echoed
    assert len(res["top_k"]) == 2 and res["top_k"][0]["prob"] >= res["top_k"][1]["prob"]
    assert "heatmap" not in res and res["batch_size"] >= 1
    pred = image_server.predictor
    expected = pred.top_k(pred.probabilities(pred.decode_upload(png, "x")), 2)[0]
    assert res["top_k"] == expected


def test_predict_with_heatmap(image_server, png):
    status, res = Client(image_server).predict(png, query="?explain=1")
    assert status == 200, res
    assert res["heatmap"].startswith("data:image/png;base64,")
    pic = Image.open(io.BytesIO(base64.b64decode(res["heatmap"].split(",", 1)[1])))
    assert pic.mode == "RGB" and min(pic.size) >= 200


def test_raw_body_upload(image_server, png):
    status, res = Client(image_server).request("POST", "/predict?filename=raw.png", png,
                                               {"Content-Type": "image/png"})
    assert status == 200 and res["file"] == "raw.png"


@pytest.mark.parametrize("data,filename,query,field,status,message", [
    (b"", "empty.png", "", "file", 400, "empty.png: empty file"),
    (b"GIF89a-but-truncated", "t.gif", "", "file", 400, "t.gif"),
    (b"hello, this is text", "notes.txt", "", "file", 400, "not a recognised file type"),
    (None, "a.wav", "", "file", 400, "this model classifies image, but the upload is WAV audio"),
    (b"\x1a\x45\xdf\xa3rest", "rec.webm", "", "file", 400, "WebM"),
    (None, "a.png", "", "image", 400, "no multipart field 'file' (fields sent: 'image')"),
    (None, "a.png", "?top_k=x", "file", 400, "top_k must be an integer"),
    (None, "a.png", "?top_k=0", "file", 400, "top_k must be >= 1"),
    (None, "a.png", "?explain=maybe", "file", 400, "explain must be 0 or 1"),
    (None, "a.png", "?topk=3", "file", 400, "unknown query parameter"),
])
def test_bad_requests_get_a_clear_400(image_server, png, tmp_path, data, filename, query, field, status, message):
    if data is None:
        data = write_wave(tmp_path / "a.wav").read_bytes() if filename.endswith(".wav") else png
    code, res = Client(image_server).predict(data, filename, query, field)
    assert code == status and message in res["error"], res


def test_size_limit_and_length(image_server):
    host, port = image_server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:  # a huge declared body: answered from the headers alone, before any byte of it is read
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", "image/png")
        conn.putheader("Content-Length", str(100 * 2**20))
        conn.endheaders()
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 413 and "upload too large" in body["error"] and r.getheader("Connection") == "close"
    finally:
        conn.close()
    code, res = Client(image_server).predict(b"\x89PNG\r\n\x1a\n" + bytes(600 * 1024))
    assert code == 413
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.putrequest("POST", "/predict")
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
    finally:
        conn.close()
    code, res = Client(image_server).request("POST", "/elsewhere", b"x")
    assert code == 404


def test_concurrent_requests_are_batched(image_server, png):
    before = image_server.batcher.stats()
    n, clients = 32, 8
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: Client(image_server).predict(png), range(n)))
    assert all(code == 200 for code, _ in results), [r for c, r in results if c != 200][:2]
    after = image_server.batcher.stats()
    served = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert served == n and batches < n  # some requests shared a batch
    assert max(r["batch_size"] for _, r in results) > 1


# --- the batcher alone -----------------------------------------------------------------------------------


class SlowPredictor:
    """Takes 50 ms a batch and records batch sizes."""

    classes = ["a", "b"]

    def __init__(self):
        self.sizes = []

    def probabilities(self, samples):
        self.sizes.append(len(samples))
        time.sleep(0.05)
        return torch.tensor([[0.25, 0.75]] * len(samples))

    def top_k(self, probs, k):
        return [[{"label": "b", "prob": 0.75}, {"label": "a", "prob": 0.25}][:k] for _ in range(len(probs))]


def test_batcher_groups_and_limits():
    pred = SlowPredictor()
    b = Batcher(pred, max_batch=4, max_wait_ms=30, max_queue=64)
    try:
        futures = [b.submit(np.zeros(1), top_k=1 + i % 2) for i in range(10)]
        results = [f.result(timeout=10) for f in futures]
        assert sum(pred.sizes) == 10 and max(pred.sizes) <= 4 and len(pred.sizes) < 10
        assert len(results[0]["top_k"]) == 1 and len(results[1]["top_k"]) == 2
        assert b.stats()["requests"] == 10
    finally:
        b.close()
    with pytest.raises(ValueError, match="max_batch >= 1"):
        Batcher(pred, max_batch=0)


def test_batcher_reports_model_errors():
    class Broken(SlowPredictor):
        def probabilities(self, samples):
            raise RuntimeError("boom")

    b = Batcher(Broken(), max_wait_ms=1)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            b.submit(np.zeros(1)).result(timeout=10)
        assert b.stats()["errors"] == 1
    finally:
        b.close()


# --- the audio server ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg-opus", "ogg-vorbis", "mp3"])
def test_predict_audio_formats(audio_server, tmp_path, fmt):
    if fmt == "mp3" and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile reads no MP3 (it does from 1.1.0)")
    kw = {"ogg-opus": {"format": "OGG", "subtype": "OPUS"}, "ogg-vorbis": {"format": "OGG", "subtype": "VORBIS"},
          "mp3": {"format": "MP3"}}
    suffix = fmt.split("-")[0]
    rate = 48000 if fmt == "ogg-opus" else 8000  # Opus runs at 8/12/16/24/48 kHz
    data = write_wave(tmp_path / f"clip.{suffix}", sample_rate=rate, **kw.get(fmt, {})).read_bytes()
    status, res = Client(audio_server).predict(data, f"clip.{suffix}", "?explain=1")
    assert status == 200, res
    assert len(res["top_k"]) == 3 and res["heatmap"].startswith("data:image/png;base64,")


def test_audio_server_rejects_images(audio_server, png):
    status, res = Client(audio_server).predict(png, "x.png")
    assert status == 400 and "this model classifies audio, but the upload is PNG image" in res["error"]
    status, res = Client(audio_server).predict(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk", "bad.wav")
    assert status == 400 and "bad.wav" in res["error"] and "cannot decode" in res["error"]


# --- hostile clients --------------------------------------------------------------------------------------


def raw(server, data: bytes, timeout: float = 10.0, shut: bool = True) -> bytes:
    """Sends raw bytes on a fresh connection (then ends the sending side) and returns all the server answers
    until it closes the connection (or ``timeout`` passes without a byte)."""
    s = socket.create_connection(server.server_address[:2], timeout=timeout)
    out = b""
    try:
        try:
            s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except OSError:  # the server answered and closed before all of it was sent: read what it said
            pass
        while True:
            try:
                chunk = s.recv(1 << 16)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


def responses(data: bytes) -> list[tuple[int, dict, bytes]]:
    """``(status, headers with lower-case names, body)`` of each HTTP response in ``data``, in order."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"not an HTTP response: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        m = re.fullmatch(r"HTTP/1\.[01] (\d{3}) .*", lines[0])
        assert m, f"bad status line {lines[0]!r}"
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((int(m.group(1)), headers, rest[:n]))
        data = rest[n:]
    return out


def request_bytes(server, method: str, path: str, body: bytes = b"", headers: list | None = None,
                  host: str | None = None) -> bytes:
    host = host if host is not None else f"127.0.0.1:{server.server_address[1]}"
    lines = [f"{method} {path} HTTP/1.1"] + ([f"Host: {host}"] if host else [])
    lines += [f"{k}: {v}" for k, v in (headers if headers is not None else [("Content-Length", len(body))])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@pytest.fixture(scope="module")
def small_png(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("small") / "s.png", 16).read_bytes()  # 16x20 = 320 pixels


@pytest.fixture(scope="module")
def strict_server(image_server):
    """The image model behind tight limits: 500 pixels, 4 parts, 4 KiB of headers, and one more allowed Host."""
    server, thread = running(image_server.predictor, max_pixels=500, max_parts=4, max_header_bytes=4096,
                             allow_hosts=("example.test",))
    yield server
    stop(server, thread)


@pytest.mark.parametrize("method,path", [("POST", "/nope"), ("POST", "/predict?top_k=x"), ("GET", "/health")])
def test_an_unread_body_is_never_taken_for_a_request(image_server, method, path):
    """Request smuggling: an answer sent before the body was read closes the connection."""
    port = image_server.server_address[1]
    smuggled = f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    answers = responses(raw(image_server, request_bytes(image_server, method, path, smuggled)))
    assert len(answers) == 1, [a[0] for a in answers]
    assert answers[0][1].get("connection") == "close"


@pytest.mark.parametrize("lengths", [["+5"], ["1_0"], ["5 5"], ["0x5"], ["-1"], [" 1_0 "], ["5", "5"], ["5", "6"]])
def test_content_length_must_be_one_header_of_digits(image_server, lengths):
    headers = [("Content-Length", v) for v in lengths] + [("Content-Type", "image/png")]
    data = request_bytes(image_server, "POST", "/predict", b"hello" + b"x" * 5, headers)
    answers = responses(raw(image_server, data))
    assert len(answers) == 1
    status, headers, body = answers[0]
    assert status == 400 and "Content-Length" in json.loads(body)["error"] and headers["connection"] == "close"


def test_chunked_uploads_are_refused_and_close(image_server):
    data = request_bytes(image_server, "POST", "/predict", b"5\r\nhello\r\n0\r\n\r\n",
                         [("Transfer-Encoding", "chunked"), ("Content-Length", "5")])
    answers = responses(raw(image_server, data))
    assert [a[0] for a in answers] == [411] and answers[0][1]["connection"] == "close"


def test_http_09_gets_a_400_with_a_status_line_without_waiting_for_headers(image_server):
    answers = responses(raw(image_server, b"GET /\r\n", shut=False))
    assert [a[0] for a in answers] == [400] and "HTTP/0.9" in json.loads(answers[0][2])["error"]


def _stall(server, n: int) -> list[socket.socket]:
    """``n`` connections that send the start of a request and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(server.server_address[:2], timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    return socks


def _wait_for(condition, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _connection_threads() -> int:
    return sum(t.name == "resnetlab-connection" for t in threading.enumerate())


def test_open_connections_are_capped_with_503(image_server):
    server, thread = running(image_server.predictor, max_connections=2, request_deadline=30)
    stalled = _stall(server, 2)
    try:
        assert _wait_for(lambda: server.connection_stats()["open_connections"] == 2)
        extra = _stall(server, 3)  # past the cap: answered 503 by the accepting thread, no thread started
        for s in extra:
            status, headers, body = responses(s.recv(4096))[0]
            assert status == 503 and headers["connection"] == "close"
            assert "connections open" in json.loads(body)["error"]
            s.close()
        assert _connection_threads() <= 2
        answers = responses(raw(server, request_bytes(server, "GET", "/health")))
        assert [a[0] for a in answers] == [503]
        assert server.connection_stats()["refused_connections"] == 4
    finally:
        for s in stalled:
            s.close()
    assert _wait_for(lambda: server.connection_stats()["open_connections"] == 0)
    assert responses(raw(server, request_bytes(server, "GET", "/health")))[0][0] == 200
    stop(server, thread)


def test_the_deadline_holds_for_the_whole_request(image_server):
    """A client that trickles a header line every 0.2 s (each read is quick) is cut off at the request's
    deadline (1 s), long before its 8 s of trickling end."""
    server, thread = running(image_server.predictor, request_deadline=1.0)
    s = socket.create_connection(server.server_address[:2], timeout=10)
    cut, answer = False, b""
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(40):
            if select.select([s], [], [], 0.2)[0]:
                answer = s.recv(4096)
                cut = True
                break
            try:
                s.sendall(f"X-Slow-{i}: x\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
    except ConnectionResetError:
        cut = True
    finally:
        s.close()
        stop(server, thread)
    assert cut, "the server was still reading after 8 s"
    assert answer == b"" or responses(answer)[0][0] == 408


def test_stalled_headers_or_body_get_408_at_the_deadline(image_server):
    server, thread = running(image_server.predictor, request_deadline=1.0)
    try:
        answer = raw(server, request_bytes(server, "POST", "/predict", b"", [("Content-Length", "100")]),
                     shut=False)
        assert [a[0] for a in responses(answer)] == [408]
        answer = raw(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", shut=False)
        assert [a[0] for a in responses(answer)] == [408]
        assert raw(server, b"", shut=False) == b""  # an idle connection is closed without a word
    finally:
        stop(server, thread)


class Wrapped:
    """A Predictor with some methods replaced (the tests' faults); everything else is the real one's."""

    def __init__(self, real, **methods):
        self._real = real
        self.__dict__.update(methods)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_concurrent_decodes_are_bounded(image_server, png):
    real, lock, now, peak = image_server.predictor, threading.Lock(), [0], [0]

    def slow_decode(data, name, **limits):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.1)
        with lock:
            now[0] -= 1
        return real.decode_upload(data, name, **limits)

    server, thread = running(Wrapped(real, decode_upload=slow_decode), max_decodes=1)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = [c for c, _ in pool.map(lambda _: Client(server).predict(png), range(4))]
        assert codes == [200] * 4 and peak[0] == 1
    finally:
        stop(server, thread)


def test_server_side_pixel_cap(strict_server, png, small_png):
    code, res = Client(strict_server).predict(png, "big.png")  # 30x34 = 1,020 pixels
    assert code == 400 and "big.png: image too large (34x30 = 1,020 pixels; this server takes at most 500)" \
        in res["error"], res
    assert Client(strict_server).predict(small_png)[0] == 200


def test_server_side_clip_length_cap(audio_server, tmp_path):
    server, thread = running(audio_server.predictor, max_audio_seconds=0.2)
    try:
        long_clip = write_wave(tmp_path / "long.wav", seconds=0.4).read_bytes()
        code, res = Client(server).predict(long_clip, "long.wav")
        assert code == 400 and "long.wav: clip too long (0.4 s declared; this server takes at most 0.2 s)" \
            in res["error"], res
        short = write_wave(tmp_path / "short.wav", seconds=0.15).read_bytes()
        assert Client(server).predict(short, "short.wav")[0] == 200
    finally:
        stop(server, thread)


@pytest.mark.parametrize("host,status", [
    ("evil.example:{port}", 403), ("evil.example", 403), ("127.0.0.1:1", 403), ("localhost.evil.example:{port}", 403),
    ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("[::1]:{port}", 200), ("LocalHost:{port}", 200),
    ("example.test", 200), ("example.test:9999", 200), ("", 400),
])
def test_host_must_name_this_server(strict_server, host, status):
    """DNS rebinding: a foreign name in Host gets 403, for the page too."""
    data = request_bytes(strict_server, "GET", "/", host=host.format(port=strict_server.server_address[1]))
    answers = responses(raw(strict_server, data))
    assert [a[0] for a in answers] == [status]
    if status != 200:
        assert b"<html" not in answers[0][2].lower() and answers[0][1]["connection"] == "close"


@pytest.mark.parametrize("origin,status", [
    (None, 200), ("http://127.0.0.1:{port}", 200), ("http://localhost:{port}", 200), ("http://example.test", 200),
    ("http://evil.example", 403), ("https://evil.example:{port}", 403), ("null", 403), ("http://127.0.0.1:1", 403),
    ("http://127.0.0.1:{port}@evil.example", 403), ("file://", 403),
])
def test_a_post_from_a_foreign_origin_is_refused(strict_server, small_png, origin, status):
    """CSRF: a page elsewhere may not POST here; the served page's own (same-origin) POST works."""
    body, ctype = multipart({"file": ("s.png", small_png)})
    headers = {"Content-Type": ctype}
    if origin is not None:
        headers["Origin"] = origin.format(port=strict_server.server_address[1])
    code, res = Client(strict_server).request("POST", "/predict", body, headers)
    assert code == status, res
    if status == 403:
        assert "cross-site POST refused" in res["error"]


def test_multipart_parts_are_capped_and_field_names_not_echoed(strict_server, small_png):
    many = {f"f{i}": (None, b"x") for i in range(8)} | {"file": ("s.png", small_png)}
    body, ctype = multipart(many)
    code, res = Client(strict_server).request("POST", "/predict", body, {"Content-Type": ctype})
    assert code == 400 and "too many multipart parts: more than 4" in res["error"]
    with pytest.raises(RequestError, match="too many multipart parts"):
        parse_multipart(body, ctype, max_parts=4)
    body, ctype = multipart({f"field{i}": (None, b"x") for i in range(4)})
    code, res = Client(strict_server).request("POST", "/predict", body, {"Content-Type": ctype})
    assert code == 400 and res["error"] == "no multipart field 'file' (fields sent: 'field0', 'field1', 'field2' " \
                                           "and 1 more)"


def test_header_bytes_are_capped(strict_server):
    headers = [(f"X-Pad-{i}", "p" * 200) for i in range(30)]  # 6 KB of headers, limit 4 KiB
    answers = responses(raw(strict_server, request_bytes(strict_server, "GET", "/health", headers=headers)))
    assert len(answers) == 1
    status, headers, body = answers[0]
    assert status == 431 and headers["connection"] == "close" and "4,096 bytes" in json.loads(body)["error"]
    answers = responses(raw(strict_server, request_bytes(strict_server, "GET", "/x" * 3000)))
    assert [a[0] for a in answers] == [414]


@pytest.mark.parametrize("fault", ["decode-memory", "decode-value", "model"])
def test_unexpected_errors_are_a_generic_json_500(image_server, png, capfd, fault):
    real = image_server.predictor

    def decode(data, name, **limits):
        raise (MemoryError if fault == "decode-memory" else ValueError)("secret /home/user/details")

    class BrokenModel(SlowPredictor):
        def probabilities(self, samples):
            raise RuntimeError("secret /home/user/details")

    methods = {"decode_upload": decode} if fault.startswith("decode") else {
        "probabilities": BrokenModel().probabilities}
    server, thread = running(Wrapped(real, **methods))
    try:
        code, res = Client(server).predict(png)
        assert code == 500 and "secret" not in json.dumps(res)
        assert res["error"] == ("internal error while running the model" if fault == "model" else
                                "internal error while decoding the upload") + "; the server's log has the details"
        assert Client(server).request("GET", "/health")[0] == 200
    finally:
        stop(server, thread)
    log = capfd.readouterr().err
    assert "Traceback" in log and "secret /home/user/details" in log


def test_page_may_not_be_framed(image_server):
    conn = http.client.HTTPConnection(*image_server.server_address[:2], timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        r = conn.getresponse()
        r.read()
        assert "frame-ancestors 'none'" in r.getheader("Content-Security-Policy")
    finally:
        conn.close()


def test_cli_allow_host_option():
    from resnetlab.cli import _parser

    args = _parser().parse_args(["serve", "run", "--allow-host", "box.lan", "--allow-host", "10.0.0.5:8000"])
    assert args.allow_host == ["box.lan", "10.0.0.5:8000"]
    with pytest.raises(ValueError, match="--allow-host 'a:b': expected NAME or NAME:PORT"):
        make_server(SlowPredictor(), "127.0.0.1", 0, allow_hosts=["a:b"])


def test_cli_serve_refuses_bad_limits_before_loading_the_model(tmp_path, capsys):
    from resnetlab.cli import main

    assert main(["serve", str(tmp_path / "nope"), "--port", "0", "--max-connections", "0"]) == 2
    assert "max_connections must be >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nope"), "--port", "0", "--allow-host", "x:y"]) == 2
    assert "--allow-host 'x:y'" in capsys.readouterr().err


# --- end to end in a real browser ------------------------------------------------------------------------


# Playwright adds --headless itself and takes the fresh profile folder as user_data_dir (--user-data-dir).
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream"]


@pytest.fixture
def chromium(tmp_path):
    """A Playwright page in the system's Chromium with a fresh profile (Playwright's own browser download is not
    used)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium; see `make browser-deps`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(tmp_path / "profile", executable_path=CHROMIUM, headless=True,
                                                       args=BROWSER_ARGS, permissions=["microphone"],
                                                       bypass_csp=True,  # wait_for_function evaluates strings
                                                       timeout=TIMEOUT * 1000)
        try:
            page = context.new_page()
            page.set_default_timeout(TIMEOUT * 1000)
            yield page
        finally:
            context.close()


@pytest.mark.slow
def test_browser_upload_shows_label_and_heatmap(image_server, chromium, tmp_path):
    page = chromium
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(image_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('resnet20')")
    f = write_image(tmp_path / "upload.png", 40, seed=5)
    page.set_input_files("#file", str(f))
    page.wait_for_function("document.getElementById('heatmap').src.startsWith('data:image/png')")
    label = page.text_content("#label")
    assert any(label.startswith(c) for c in ("c0", "c1", "c2")), label
    assert page.eval_on_selector("#heatmap", "img => img.complete && img.naturalWidth") >= 200
    assert len(page.query_selector_all("#topk .bar")) == 3
    assert page.text_content("#error") == ""
    # a wrong file shows the server's message
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "not a recognised file type" in page.text_content("#error")
    assert not errors


@pytest.mark.slow
def test_browser_microphone_recording(audio_server, chromium):
    """Chromium's fake microphone (a beep) -> the page's WAV encoder -> /predict -> a label and a heat map."""
    page = chromium
    page.goto(audio_server.url + "/")
    page.wait_for_function("!document.getElementById('record').hidden")
    page.click("#record")
    page.wait_for_function("document.getElementById('heatmap').src.startsWith('data:image/png')")
    assert page.text_content("#error") == ""
    assert "recording.wav" in page.text_content("#status")
    assert page.get_attribute("#label", "data-label") in ("c0", "c1", "c2")


# --- the command line ------------------------------------------------------------------------------------


def test_cli_serve_refuses_a_missing_run(tmp_path, capsys):
    from resnetlab.cli import main

    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_serve_starts_answers_and_stops(tmp_path):
    """``resnetlab serve RUN --port 0`` in its own process: the URL it prints answers; Ctrl-C stops it cleanly."""
    import re
    import signal
    import subprocess
    import sys

    run = make_run(tmp_path / "run")
    env = {**os.environ, "RESNETLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "resnetlab", "serve", str(run), "--port", "0", "--backend", "eager"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"no URL in the server's output: {line!r}"
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=TIMEOUT)
        conn.request("GET", "/health")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["backend"] == "eager"
        conn.close()
        proc.send_signal(signal.SIGINT)
        # communicate() drains stderr while waiting (a full pipe must not stall the exit); generous on a busy box
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert "stopping" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
