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
import threading
import time
import uuid

import numpy as np
import pytest
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
    status, page = c.request("GET", "/")
    assert status == 200 and b'id="file"' in page and b'id="heatmap"' in page
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


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg-opus", "ogg-vorbis"])
def test_predict_audio_formats(audio_server, tmp_path, fmt):
    kw = {"ogg-opus": {"format": "OGG", "subtype": "OPUS"}, "ogg-vorbis": {"format": "OGG", "subtype": "VORBIS"}}
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
