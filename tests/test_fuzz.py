"""Property-based fuzzing (hypothesis), a few seconds per test:

- the config layer: any keys and values, from Python or from YAML text, end in a TrainConfig or a ValueError;
- the decoders: random bytes and damaged real files named .png/.jpg/.wav/.flac decode or raise DataError, never
  another exception, a crash or a hang (each example has a deadline);
- the HTTP server, live on 127.0.0.1: mutated request lines, headers, Content-Length, chunked bodies, truncated
  requests and damaged multipart uploads each get a well-formed HTTP answer (200, 4xx or 5xx; never a 500 for an
  upload), every socket has a timeout, and the server still answers /health and holds no connection afterwards.
"""

from __future__ import annotations

import io
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

pytest.importorskip("hypothesis", reason="pip install -e '.[dev]' brings hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from resnetlab.data.audio import decode_audio
from resnetlab.data.errors import DataError
from resnetlab.data.images import decode_image
from resnetlab.training.config import TrainConfig, coerce, load_yaml, make_config

FIELDS = [f for f in TrainConfig.__dataclass_fields__]
# No example database: nothing is written into the repository; each run draws fresh examples.
FUZZ = settings(max_examples=150, deadline=5000, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=20) | st.sampled_from(["auto", "cpu", "sgd", "1e3", "nan", "-inf", "true", "0x10", ""]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner,
                                                                                            max_size=3),
                      max_leaves=8)
keys = st.sampled_from(FIELDS) | st.text(max_size=15)


@FUZZ
@given(key=keys, value=values)
def test_coerce_returns_or_raises_value_error(key, value):
    try:
        coerce(TrainConfig, key, value)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(layers=st.lists(st.dictionaries(keys, values, max_size=6), max_size=3))
def test_make_config_returns_a_config_or_raises_value_error(layers):
    try:
        cfg = make_config(TrainConfig, *layers)
    except ValueError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, TrainConfig)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


yaml_text = st.text(max_size=200) | st.lists(
    st.tuples(st.sampled_from(FIELDS + ["bogus", "- x", "{", "[", "!!python/object:os.system", "&a", "*a"]),
              st.text(max_size=15)), max_size=6).map(lambda kv: "\n".join(f"{k}: {v}" for k, v in kv))


@FUZZ
@given(text=yaml_text | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_yaml_configs_load_or_raise_value_error(scratch, text):
    path = scratch / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        make_config(TrainConfig, load_yaml(path))
    except ValueError as e:
        assert str(e) and "\n" not in str(e)


# --- decoders -----------------------------------------------------------------------------------------------------


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _audio_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    wave = np.sin(np.arange(800) / 5).astype(np.float32) * 0.5
    sf.write(buf, wave, 8000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


SAMPLES = {".png": _image_bytes("PNG"), ".jpg": _image_bytes("JPEG"), ".wav": _audio_bytes("WAV"),
           ".flac": _audio_bytes("FLAC")}
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"GIF89a",
         b"BM", b"OggS"]


@st.composite
def damaged(draw, ext: str) -> bytes:
    """A real file of this type with random bytes overwritten and a random cut, or noise after a signature."""
    if draw(st.booleans()):
        return draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=400))
    data = bytearray(SAMPLES[ext])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def _decode(path: Path):
    if path.suffix in (".png", ".jpg"):
        return decode_image(path, size=(8, 8), channels=3)
    return decode_audio(path, sample_rate=8000, num_samples=400)


@pytest.mark.parametrize("ext", sorted(SAMPLES))
def test_damaged_files_decode_or_raise_data_error(scratch, ext):
    path = scratch / f"sample{ext}"

    @FUZZ
    @given(data=damaged(ext))
    def check(data):
        path.write_bytes(data)
        try:
            out = _decode(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert out.shape == ((3, 8, 8) if ext in (".png", ".jpg") else (400,))

    check()
    os.remove(path)


# --- the HTTP server --------------------------------------------------------------------------------------------

HTTP_FUZZ = settings(max_examples=120, deadline=10000, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    """The image server on a free port of 127.0.0.1, with small limits so that the fuzzer reaches them."""
    from deploy_helpers import make_run, write_image
    from resnetlab.deploy.predictor import Predictor
    from resnetlab.deploy.serve import make_server

    root = tmp_path_factory.mktemp("fuzz-serve")
    server = make_server(Predictor.load(make_run(root / "run"), backend="eager", device="cpu"), "127.0.0.1", 0,
                         max_upload_mb=0.25, max_wait_ms=1, request_deadline=3.0, max_header_bytes=4096,
                         max_parts=8, max_pixels=4096)
    server.png = write_image(root / "x.png", 12).read_bytes()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def _exchange(server, data: bytes) -> bytes:
    """Sends ``data`` on a fresh connection, ends the sending side and reads until the server closes it. Any wait
    for the server is bounded by the socket's timeout (the server's deadline is 3 s)."""
    s = socket.create_connection(server.server_address[:2], timeout=8)
    out = b""
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # answered and closed before all of it was sent
            pass
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    return out


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


def _first_answer(out: bytes, head_request: bool) -> int:
    """The status of the first final answer in ``out`` after checking its framing (1xx answers skipped)."""
    while True:
        m = _STATUS.match(out)
        assert m, f"not an HTTP answer: {out[:120]!r}"
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep, f"answer without the end of its headers: {out[:200]!r}"
        status = int(m.group(1))
        if 100 <= status < 200:
            out = rest
            continue
        lengths = re.findall(rb"\r\nContent-Length: (\d+)", head)
        assert len(lengths) == 1, head
        body_len = int(lengths[0])
        if head_request and not (len(rest) == body_len and b"\r\nConnection: close" in head):
            body_len = 0  # no body for HEAD, unless the request line was refused before its method was read
        assert len(rest) >= body_len, f"answer cut short: {len(rest)} of {body_len} bytes"
        after = rest[body_len:]
        assert not after or after.startswith(b"HTTP/1."), after[:120]
        assert status == 200 or 400 <= status < 600, status
        return status


def _after_fuzzing(server) -> None:
    end = time.monotonic() + 15
    while server.connection_stats()["open_connections"] and time.monotonic() < end:
        time.sleep(0.05)
    assert server.connection_stats()["open_connections"] == 0
    out = _exchange(server, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.server_address[1]}\r\n\r\n".encode())
    assert _first_answer(out, False) == 200


def _multipart(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    out = b""
    for name, data in parts:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="x.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@st.composite
def http_requests(draw, server) -> tuple[bytes, bool]:
    """Raw request bytes and whether its method is HEAD: each part of the framing drawn from real, malformed and
    hostile values, the body a multipart upload, a chunked one or noise, and the whole perhaps cut short."""
    port = server.server_address[1]
    text = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=30)
    method = draw(st.sampled_from(["GET", "POST", "POST", "HEAD", "PUT", "OPTIONS", "get", "PO ST", ""]) | text)
    path = draw(st.sampled_from(["/", "/health", "/info", "/predict", "/predict?top_k=2&explain=1", "/nope", "*",
                                 "http://evil.example/predict", "/predict?top_k=-1", "/%00", "//", "/" + "a" * 5000])
                | text)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/0.9", "HTTP/2.0", "HTTP/1.1x", "",
                                    "http/1.1", "HTTP/1.10000000000"]))
    eol = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    boundary = uuid.uuid4().hex
    kind = draw(st.sampled_from(["multipart", "multipart", "raw", "noise", "none"]))
    body = {"multipart": _multipart([("file", server.png)], boundary), "raw": server.png,
            "noise": draw(st.binary(max_size=300)), "none": b""}[kind]
    chunked = draw(st.booleans()) and draw(st.booleans())
    if chunked:
        body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    headers = []
    host = draw(st.sampled_from([f"127.0.0.1:{port}", f"127.0.0.1:{port}", f"localhost:{port}", "evil.example",
                                 None, "", f"[::1]:{port}", f"127.0.0.1:{port}x"]))
    if host is not None:
        headers.append(("Host", host))
    length = draw(st.sampled_from(["right", "right", "right", "none", "+5", "1_0", "-1", "99999999999999999999",
                                   "short", "long", "twice", "twice-different", " 7"]))
    n = len(body)
    for value in {"right": [n], "none": [], "short": [max(n - 7, 0)], "long": [n + 100], "twice": [n, n],
                  "twice-different": [n, n + 1]}.get(length, [length]):
        headers.append(("Content-Length", str(value)))
    if chunked:
        te = draw(st.sampled_from(["chunked", "Chunked", "gzip, chunked", " chunked"]))
        headers.append(("Transfer-Encoding", te))
    headers.append(("Content-Type", draw(st.sampled_from([f"multipart/form-data; boundary={boundary}",
                                                          "multipart/form-data", "image/png",
                                                          "multipart/form-data; boundary=other"]))))
    for _ in range(draw(st.integers(0, 3))):
        headers.append(draw(st.sampled_from([("Expect", "100-continue"), ("Connection", "close"),
                                             ("Connection", "keep-alive"), ("Origin", "http://evil.example"),
                                             ("Origin", f"http://127.0.0.1:{port}"), ("X-Pad", "p" * 5000),
                                             ("Host", "evil.example")])
                            | st.tuples(text, text)))
    head = f"{method} {path} {version}".rstrip() + eol + "".join(f"{k}: {v}{eol}" for k, v in headers) + eol
    data = head.encode("latin-1") + body
    if draw(st.integers(0, 4)) == 0:  # cut short anywhere
        data = data[: draw(st.integers(0, len(data)))]
    return data, method == "HEAD"


def test_http_framing_always_gets_a_well_formed_answer(http_server):
    @HTTP_FUZZ
    @given(request=http_requests(http_server))
    def check(request):
        data, head = request
        out = _exchange(http_server, data)
        if not out:  # the server may close without a word only when no request line came
            assert not data.split(b"\n", 1)[0].strip(), data[:120]
            return
        _first_answer(out, head)

    check()
    _after_fuzzing(http_server)


@st.composite
def damaged_uploads(draw, png: bytes) -> tuple[bytes, str]:
    """A multipart upload of a PNG with its bytes, its boundary lines or its parts damaged."""
    boundary = uuid.uuid4().hex
    parts = [("file", png)] + [(draw(st.sampled_from(["note", "file", "x" * 300, ""])), draw(st.binary(max_size=40)))
                               for _ in range(draw(st.integers(0, 10)))]
    body = bytearray(_multipart(draw(st.permutations(parts)), boundary))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, len(body) - 1))
        if op == "flip":
            body[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del body[at: at + draw(st.integers(1, 200))]
        else:
            body[at:at] = draw(st.sampled_from([b"\r\n", f"--{boundary}\r\n".encode(), b"\r\n\r\n", b"--", b"\x00"]))
        if not body:
            break
    return bytes(body), f"multipart/form-data; boundary={boundary}"


def test_damaged_multipart_uploads_get_200_or_4xx(http_server):
    port = http_server.server_address[1]

    @HTTP_FUZZ
    @given(upload=damaged_uploads(http_server.png))
    def check(upload):
        body, ctype = upload
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        status = _first_answer(_exchange(http_server, head + body), False)
        assert status == 200 or 400 <= status < 500, status

    check()
    _after_fuzzing(http_server)
