"""Property-based fuzzing (hypothesis), a few seconds per test:

- the config layer: any keys and values, from Python or from YAML text, end in a TrainConfig or a ValueError;
- the decoders, against a wall clock: WAV, FLAC and PNG files with mutated header fields and damaged files named
  .png/.jpg/.wav/.flac decode or raise a one-line DataError, each in a worker subprocess with a time limit, so a
  hang, a crash or a MemoryError is a finding (seeded, not hypothesis: the set is fixed and runs in seconds);
- the HTTP server, live on 127.0.0.1: mutated request lines, headers, Content-Length, chunked bodies, truncated
  requests and damaged multipart uploads each get a well-formed HTTP answer (200, 4xx or 5xx; never a 500 for an
  upload), every socket has a timeout, and the server still answers /health and holds no connection afterwards.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

pytest.importorskip("hypothesis", reason="pip install -e '.[dev]' brings hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import hostile_files
import resnetlab
from resnetlab.training.config import TrainConfig, coerce, load_yaml, make_config

FIELDS = [f for f in TrainConfig.__dataclass_fields__]
# No example database: nothing is written into the repository. A developer's run draws fresh examples (new findings);
# CI (CI=true) draws the same ones every time, so a red CI names a change, not a lucky draw.
DERANDOMIZE = os.environ.get("CI", "").lower() == "true"
FUZZ = settings(max_examples=150, deadline=5000, database=None, derandomize=DERANDOMIZE,
                suppress_health_check=[HealthCheck.too_slow])

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


# --- decoders, against a wall clock -------------------------------------------------------------------------------
# Every decode runs in a worker subprocess (tests/decode_worker.py) that the test kills when one file takes longer than
# DECODE_LIMIT_S: a hang is a finding, as are a crash, a MemoryError under the worker's address-space cap, any other
# exception, a wrong shape, or a DataError that is not one line naming the file. The files are header-field mutations
# (WAV: format, channels, rate, byte rate, block align, bits, chunk sizes; FLAC STREAMINFO: block and frame sizes,
# rate, channels, bits, frame count; PNG IHDR: width, height, depth, colour type, methods, and chunk lengths) and
# random damage (bytes overwritten, a cut, noise after a signature), from fixed seeds.

DECODE_LIMIT_S = 10.0  # per file; a normal one takes milliseconds, the forged-rate WAV used to take forever
FUZZ_DEADLINE_S = 120.0  # for the whole set, worker start-ups included (about 3 s on an idle 2-core machine)


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


SAMPLES = {".png": _image_bytes("PNG"), ".jpg": _image_bytes("JPEG"), ".wav": hostile_files.wav(16000, 800),
           ".flac": _audio_bytes("FLAC")}
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"GIF89a",
         b"BM", b"OggS"]
U32 = [0, 1, 2, 3, 255, 999, 1000, 8000, 44100, 768_000, 768_001, 600_000_000, 2**31 - 1, 2**32 - 1]
U16 = [0, 1, 2, 3, 4, 7, 8, 16, 24, 32, 64, 255, 0xFFFE, 0xFFFF]
# (offset, struct format, values) of the fields of the WAV header hostile_files.wav writes
WAV_FIELDS = [(4, "<I", [0, 36, 2**31, 2**32 - 1]), (20, "<H", [0, 1, 2, 3, 6, 7, 0xFFFE, 0xFFFF]),
              (22, "<H", U16), (24, "<I", U32), (28, "<I", [0, 1, 2**32 - 1]), (32, "<H", U16), (34, "<H", U16),
              (40, "<I", [0, 1, 3, 1599, 1601, 2**31 - 1, 2**32 - 1])]
# STREAMINFO after "fLaC" + block header: min/max block size (16 bits), min/max frame size (24 bits), then
# rate:20 channels-1:3 bits-1:5 frames:36
FLAC_FIELDS = [(8, 2, [0, 1, 15, 16, 4096, 65535]), (10, 2, [0, 1, 15, 16, 4096, 65535]),
               (12, 3, [0, 1, 2**24 - 1]), (15, 3, [0, 1, 2**24 - 1])]
FLAC_STREAM = [("rate", [0, 1, 999, 1000, 44100, 768_000, 768_001, 2**20 - 1]), ("channels", list(range(1, 9))),
               ("frames", [0, 1, 799, 801, 2**26, 2**27 + 1, 2**36 - 1])]
PNG_IHDR = [(16, ">I", [0, 1, 7000, 65535, 2**31 - 1, 2**32 - 1]), (20, ">I", [0, 1, 7000, 65535, 2**31 - 1]),
            (24, ">B", [0, 1, 2, 3, 4, 8, 16, 255]), (25, ">B", [0, 1, 2, 3, 4, 5, 6, 7]),
            (26, ">B", [0, 1]), (27, ">B", [0, 1]), (28, ">B", [0, 1, 2])]


def _damage(rng: random.Random, data: bytes) -> bytes:
    if rng.random() < 0.3:
        return rng.choice(MAGIC) + rng.randbytes(rng.randrange(400))
    b = bytearray(data)
    for _ in range(rng.randrange(9)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b[: rng.randrange(len(b) + 1)])


def _set_field(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _with_png_crc(data: bytes) -> bytes:
    b = bytearray(data)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])))
    return bytes(b)


def fuzz_files(seed: int = 0) -> list[tuple[str, bytes]]:
    """``(suffix, bytes)`` of every file the decoder fuzzer tries: each header field at each of its values, random
    combinations of two or three fields, and random damage; the same list for the same seed."""
    rng = random.Random(seed)
    files = []
    wav = SAMPLES[".wav"]
    for off, fmt, values in WAV_FIELDS:
        files += [(".wav", _set_field(wav, off, fmt, v)) for v in values]
    for _ in range(20):
        b = wav
        for off, fmt, values in rng.sample(WAV_FIELDS, rng.choice([2, 3])):
            b = _set_field(b, off, fmt, rng.choice(values))
        files.append((".wav", b))
    flac = SAMPLES[".flac"]
    for off, width, values in FLAC_FIELDS:
        files += [(".flac", flac[:off] + v.to_bytes(width, "big") + flac[off + width:]) for v in values]
    for field, values in FLAC_STREAM:
        files += [(".flac", hostile_files.flac(**{f"declared_{field}": v})) for v in values]
    for _ in range(10):
        kwargs = {f"declared_{f}": rng.choice(v) for f, v in rng.sample(FLAC_STREAM, 2)}
        files.append((".flac", hostile_files.flac(**kwargs)))
    png = SAMPLES[".png"]
    for off, fmt, values in PNG_IHDR:
        for v in values:
            files.append((".png", _with_png_crc(_set_field(png, off, fmt, v))))
            if off == 16:
                files.append((".png", _set_field(png, off, fmt, v)))  # a CRC that no longer matches
    idat = png.index(b"IDAT") - 4
    files += [(".png", _set_field(png, idat, ">I", v)) for v in (0, 1, 2**31 - 1, 2**32 - 1)]
    for ext in (".png", ".jpg", ".wav", ".flac"):
        files += [(ext, _damage(rng, SAMPLES[ext])) for _ in range(12)]
    return files


def _read_line(proc: subprocess.Popen, buf: bytearray, timeout: float) -> str | None:
    """The worker's next stdout line, ``""`` at its end, ``None`` if none came within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            return None
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            return ""
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def decode_in_workers(manifest: list[list[str]], folder: Path, deadline_s: float = FUZZ_DEADLINE_S,
                      file_limit_s: float = DECODE_LIMIT_S, worker: Path | None = None) -> dict[int, tuple[str, str]]:
    """``{index: (outcome, detail)}`` of every file of ``manifest`` decoded by decode_worker.py subprocesses: a file
    that takes longer than ``file_limit_s`` is a ``hang`` (its worker is killed, a new one goes on after it), a
    worker that dies is a ``crash``. Raises AssertionError past ``deadline_s`` for the whole set."""
    (folder / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(resnetlab.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    worker = worker or Path(__file__).with_name("decode_worker.py")
    stop = time.monotonic() + deadline_s
    outcomes: dict[int, tuple[str, str]] = {}
    start = 0
    while start < len(manifest):
        with open(folder / "stderr.txt", "w+b") as err:
            proc = subprocess.Popen([sys.executable, str(worker), str(folder / "manifest.json"), str(start)],
                                    stdout=subprocess.PIPE, stderr=err, env=env)
            buf, current = bytearray(), None
            try:
                line = _read_line(proc, buf, max(stop - time.monotonic(), 0))
                assert line == "ready", f"decode worker did not start: {line!r}"
                while True:
                    line = _read_line(proc, buf, min(file_limit_s, max(stop - time.monotonic(), 0)))
                    if line is None:
                        assert current is not None and time.monotonic() < stop, (
                            f"decoder fuzzing past its {deadline_s:.0f} s deadline, {len(outcomes)} of "
                            f"{len(manifest)} files done")
                        outcomes[current] = ("hang", f"no answer within {file_limit_s:.0f} s")
                        start = current + 1
                        break
                    if line == "":  # the worker is gone
                        if current is None:
                            start = len(manifest)
                        else:
                            proc.wait(10)
                            err.seek(0)
                            tail = " ".join(err.read().decode(errors="replace").split())[-300:]
                            outcomes[current] = ("crash", f"exit status {proc.returncode}: {tail}")
                            start = current + 1
                        break
                    if line.startswith("start "):
                        current = int(line.split()[1])
                    else:
                        i, outcome, detail = json.loads(line)
                        outcomes[i], current = (outcome, detail), None
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
    return outcomes


def test_mutated_headers_and_damaged_files_decode_or_raise_data_error_within_a_deadline(scratch):
    files = fuzz_files(seed=0)
    manifest = []
    for i, (ext, data) in enumerate(files):
        path = scratch / f"f{i:04d}{ext}"
        path.write_bytes(data)
        manifest.append([str(path), "image" if ext in (".png", ".jpg") else "audio"])
    outcomes = decode_in_workers(manifest, scratch)
    assert len(outcomes) == len(files) >= 200
    findings = {manifest[i][0]: o for i, o in outcomes.items() if o[0] not in ("ok", "data-error")}
    assert not findings, findings
    kinds = {o for o, _ in outcomes.values()}
    assert kinds == {"ok", "data-error"}  # both reached: the mutations are not all refused up front


def test_the_wall_clock_fuzzer_reports_a_hang_and_a_crash(tmp_path):
    """The harness itself, with a stand-in worker that speaks decode_worker.py's protocol without importing torch: a
    decode that never returns and one that kills its process are findings, and the files after them still run."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text("import json, os, sys, time\n"
                    "manifest = json.load(open(sys.argv[1]))\n"
                    "print('ready', flush=True)\n"
                    "for i in range(int(sys.argv[2]), len(manifest)):\n"
                    "    print(f'start {i}', flush=True)\n"
                    "    what = manifest[i][0]\n"
                    "    if what == 'hang': time.sleep(60)\n"
                    "    if what == 'crash': os._exit(9)\n"
                    "    print(json.dumps([i, 'ok', '(3, 8, 8)']), flush=True)\n")
    manifest = [["hang", "image"], ["fine", "image"], ["crash", "image"], ["after", "image"]]
    outcomes = decode_in_workers(manifest, tmp_path, file_limit_s=1.0, worker=fake)
    assert [outcomes[i][0] for i in range(4)] == ["hang", "ok", "crash", "ok"], outcomes
    assert "exit status 9" in outcomes[2][1]


# --- the HTTP server --------------------------------------------------------------------------------------------

HTTP_FUZZ = settings(max_examples=120, deadline=10000, database=None, derandomize=DERANDOMIZE,
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
