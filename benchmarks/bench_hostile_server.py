"""Hostile clients against ``resnetlab serve`` on 127.0.0.1: stalled connections, decompression-bomb uploads and
each hostile HTTP case of issue 15, with the server's threads and memory read from ``/proc/<pid>/status``.

The server runs as its own process (``python -m resnetlab serve RUN --backend eager``, a ResNet-18 at 224x224
with seeded random weights: the model hardly matters here). Three parts, each bounded in count and time:

(a) ``--connections`` (2,000) connections that send the start of a request and then nothing, opened as fast as
    the loop goes and held; the server's thread count and RSS are sampled every 20 ms against its caps
    (threads: those it had before, plus ``--max-connections``, plus the 2 decoder threads it may start); then
    a normal ``GET /health`` is tried every 50 ms until it answers 200: that must happen within one
    per-request deadline after the last stalled connection was opened.
(b) 16 concurrent uploads of a ~49-megapixel PNG of about 140 KB (made with numpy + PIL), against a server with
    the default pixel cap (refused from the header) and with the cap lifted to the data layer's 50 MP, where
    ``--max-decodes`` bounds what is decoded at once; and 16 of a 4096x4096 PNG, just under the default cap,
    the worst the defaults let through. The server's peak RSS is its ``VmHWM``.
(c) Each hostile HTTP case, its outcome and the time from its last byte sent to the answer (or the close).

    .venv/bin/python benchmarks/bench_hostile_server.py [--connections 2000] [--deadline 5] [--quick]

The file-descriptor limit is raised to its hard limit inside the script (2,000 sockets need more than 1,024).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import re
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from _common import ROOT, machine, print_machine, record, scratch  # noqa: E402
from bench_inference import write_run  # noqa: E402
from bench_serve import free_port, get_json, multipart, photo_jpeg  # noqa: E402


def proc_status(pid: int) -> dict:
    """``Threads``, ``VmRSS`` and ``VmHWM`` (peak RSS) of a process, the sizes in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Threads":
            out["threads"] = int(value)
        elif key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


class Sampler:
    """Samples a process's threads and RSS every ``every`` seconds in a thread; keeps the maxima."""

    def __init__(self, pid: int, every: float = 0.02):
        self.pid, self.every = pid, every
        self.max_threads = self.max_rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                s = proc_status(self.pid)
            except OSError:
                return
            self.max_threads = max(self.max_threads, s["threads"])
            self.max_rss = max(self.max_rss, s["VmRSS"])
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def start_server(run: Path, port: int, extra: list[str], log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "resnetlab", "serve", str(run), "--port", str(port), "--backend", "eager",
           "--device", "cpu", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 120:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            get_json(port, "/health", timeout=2)
            log(f"server up in {time.perf_counter() - t0:.1f} s: {' '.join(cmd[3:])}")
            return proc
        except (OSError, ValueError):
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def status_of(port: int, path: str = "/health", timeout: float = 2.0) -> int | None:
    """The status of a normal GET on a fresh connection, or None when it fails."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            m = re.match(rb"HTTP/1\.[01] (\d{3})", s.recv(64))
            return int(m.group(1)) if m else None
    except OSError:
        return None


# --- (a) stalled connections -----------------------------------------------------------------------------------


def stalled_connections(port: int, pid: int, n: int, deadline: float, max_connections: int, log) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 256), hard))
    before = proc_status(pid)
    socks, failed = [], 0
    with Sampler(pid) as sampler:
        t0 = time.monotonic()
        for _ in range(n):
            if time.monotonic() - t0 > 60:  # bounded in time as well as in count
                break
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", port))
                s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Stall: ".encode())
                socks.append(s)
            except OSError:
                failed += 1
                s.close()
        opened = time.monotonic() - t0
        probes, first_ok = 0, None
        while time.monotonic() - t0 < 3 * deadline + 10:
            probes += 1
            if status_of(port) == 200:
                first_ok = time.monotonic() - t0
                break
            time.sleep(0.05)
        after = proc_status(pid)
    outcomes = {"503 then closed": 0, "408 at the deadline, closed": 0, "closed without an answer": 0,
                "still open": 0, "other": 0}
    for s in socks:
        s.setblocking(False)
        try:
            data = s.recv(4096)
            key = ("503 then closed" if data.startswith(b"HTTP/1.1 503") else
                   "408 at the deadline, closed" if data.startswith(b"HTTP/1.1 408") else
                   "closed without an answer" if data == b"" else "other")
        except BlockingIOError:
            key = "still open"
        except OSError:
            key = "closed without an answer"  # reset
        outcomes[key] += 1
        s.close()
    res = {"connections": n, "opened": len(socks), "connect_failed": failed, "open_s": round(opened, 2),
           "deadline_s": deadline, "max_connections": max_connections, "threads_before": before["threads"],
           "threads_peak": int(sampler.max_threads),
           # connection threads, plus the decoder threads (started on the first uploads: up to --max-decodes 2)
           "threads_cap": before["threads"] + max_connections + 2,
           "rss_before_mib": before["VmRSS"], "rss_peak_mib": sampler.max_rss, "rss_after_mib": after["VmRSS"],
           "answers_again_s_after_attack_start": None if first_ok is None else round(first_ok, 2),
           "answers_again_s_after_last_connection": None if first_ok is None else round(first_ok - opened, 2),
           "probes": probes, "outcomes": outcomes}
    res["threads_within_cap"] = res["threads_peak"] <= res["threads_cap"]
    res["answers_within_deadline"] = first_ok is not None and first_ok - opened <= deadline
    log(f"(a) {json.dumps(res)}")
    return res


# --- (b) 16 concurrent 49 MP PNG uploads -----------------------------------------------------------------------


def bomb_png(side: int = 7000) -> bytes:
    """A side x side RGB PNG of black with a few red lines: at 7000, 49 MP in ~140 KB that decode to 147 MB."""
    a = np.zeros((side, side, 3), np.uint8)
    a[::97, :, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def concurrent_bombs(run: Path, png: bytes, uploads: int, extra: list[str], log) -> dict:
    port = free_port()
    proc = start_server(run, port, extra, log)
    try:
        before = proc_status(proc.pid)
        body, ctype = multipart(png, "bomb.png")
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

        def upload(_):
            t = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
                s.sendall(head + body)
                data = b""
                while chunk := s.recv(1 << 16):
                    data += chunk
            m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
            msg = data.partition(b"\r\n\r\n")[2][:160].decode("utf-8", "replace")
            return (int(m.group(1)) if m else None), time.perf_counter() - t, msg

        with Sampler(proc.pid) as sampler:
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(uploads) as pool:
                results = list(pool.map(upload, range(uploads)))
            wall = time.perf_counter() - t0
        after = proc_status(proc.pid)
    finally:
        stop_server(proc)
    codes: dict[int, int] = {}
    for code, _, _ in results:
        codes[code] = codes.get(code, 0) + 1
    times = sorted(t for _, t, _ in results)
    res = {"server_options": " ".join(extra), "uploads": uploads, "png_bytes": len(png), "statuses": codes,
           "example_answer": results[0][2], "first_answer_s": round(times[0], 2), "last_answer_s": round(times[-1], 2),
           "wall_s": round(wall, 2), "rss_before_mib": before["VmRSS"], "rss_peak_sampled_mib": sampler.max_rss,
           "peak_rss_vmhwm_mib": after["VmHWM"]}
    log(f"(b) {json.dumps(res)}")
    return res


# --- (c) each hostile HTTP case --------------------------------------------------------------------------------


def exchange(port: int, data: bytes | list[tuple[float, bytes]], timeout: float = 30.0) -> dict:
    """Sends ``data`` (or ``(pause, bytes)`` steps, stopping when the server closes) and reads until the server
    closes. Returns the answer bytes, the seconds from the last byte sent to the first complete answer (None
    without one) and from the connection's start to its close by the server (None if still open at ``timeout``)."""
    steps = [(0.0, data)] if isinstance(data, bytes) else data
    out, answered, closed = b"", None, None
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        start = last = time.perf_counter()
        try:
            for pause, chunk in steps:
                if pause:
                    time.sleep(pause)
                s.sendall(chunk)
                last = time.perf_counter()
        except OSError:  # cut off while sending
            pass
        try:
            while chunk := s.recv(1 << 16):
                out += chunk
                head, sep, rest = out.partition(b"\r\n\r\n")
                n = re.search(rb"Content-Length: (\d+)", head)
                if answered is None and sep and n and len(rest) >= int(n.group(1)):
                    answered = time.perf_counter() - last
            closed = time.perf_counter() - start
        except ConnectionResetError:
            closed = time.perf_counter() - start
        except TimeoutError:
            pass
    return {"answer": out, "answer_s": answered, "closed_after_s": closed}


def summary(out: bytes) -> str:
    """``404, 200`` style list of the answers' statuses (with their errors), and whether the server closed."""
    parts = []
    for m in re.finditer(rb"HTTP/1\.[01] (\d{3})[^\r]*\r\n(.*?)\r\n\r\n", out, re.S):
        body = out[m.end():m.end() + 400]
        err = re.match(rb'\{"error": "((?:[^"\\]|\\.)*)"', body)
        parts.append(m.group(1).decode() + (f" ({err.group(1).decode()[:90]})" if err else ""))
    return "; ".join(parts) or "closed without an answer"


def hostile_cases(port: int, deadline: float, png: bytes, log) -> list[dict]:
    host = f"127.0.0.1:{port}"

    def req(method, path, body=b"", headers=None, host_value=host):
        lines = [f"{method} {path} HTTP/1.1"] + ([f"Host: {host_value}"] if host_value else [])
        hs = headers if headers is not None else [("Content-Length", str(len(body)))]
        return ("\r\n".join(lines + [f"{k}: {v}" for k, v in hs]) + "\r\n\r\n").encode("latin-1") + body

    smuggled = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    up, ctype = multipart(png, "photo.jpg")
    b = uuid.uuid4().hex
    tiny = f'--{b}\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'.encode()
    tiny_parts = tiny * ((16 * 2**20 - 100) // len(tiny)) + f"--{b}--\r\n".encode()
    fields = b"".join(f'--{b}\r\nContent-Disposition: form-data; name="field{i}"\r\n\r\nx\r\n'.encode()
                      for i in range(15)) + f"--{b}--\r\n".encode()
    cases = [
        ("POST /nope, its Content-Length body holding GET /health", req("POST", "/nope", smuggled)),
        ("GET /health with a Content-Length body holding GET /health", req("GET", "/health", smuggled)),
        ("Content-Length: +5", req("POST", "/predict", b"hello", [("Content-Length", "+5")])),
        ("Content-Length: 1_0", req("POST", "/predict", b"helloworld", [("Content-Length", "1_0")])),
        ("two Content-Length: 5 headers", req("POST", "/predict", b"hello", [("Content-Length", "5")] * 2)),
        ("Transfer-Encoding: chunked with Content-Length", req("POST", "/predict", b"5\r\nhello\r\n0\r\n\r\n",
                                                               [("Transfer-Encoding", "chunked"),
                                                                ("Content-Length", "5")])),
        ("100 headers of 1,000 bytes (100 KB)", req("GET", "/health", headers=[(f"X-{i}", "x" * 1000)
                                                                               for i in range(100)])),
        ("a 20,000-byte request line", req("GET", "/" + "a" * 20000)),
        ("HTTP/0.9 request (GET / without a version)", b"GET /\r\n"),
        ("Host: evil.example (DNS rebinding) GET /", req("GET", "/", host_value="evil.example")),
        ("no Host header", req("GET", "/health", host_value="")),
        ("POST /predict with Origin: http://evil.example (CSRF)",
         req("POST", "/predict", up, [("Content-Length", str(len(up))), ("Content-Type", ctype),
                                      ("Origin", "http://evil.example")])),
        (f"POST /predict with Origin: http://{host} (the page's own)",
         req("POST", "/predict", up, [("Content-Length", str(len(up))), ("Content-Type", ctype),
                                      ("Origin", f"http://{host}")])),
        (f"16 MiB of {tiny_parts.count(b'--' + b.encode()) - 1:,} tiny multipart parts",
         req("POST", "/predict", tiny_parts, [("Content-Length", str(len(tiny_parts))),
                                              ("Content-Type", f"multipart/form-data; boundary={b}")])),
        ("15 fields, none named file", req("POST", "/predict", fields, [("Content-Length", str(len(fields))),
                                                                       ("Content-Type",
                                                                        f"multipart/form-data; boundary={b}")])),
        ("headers trickled, one 2-byte line every 0.1 s",
         [(0.0, f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())]
         + [(0.1, f"X{i}: \r\n".encode()) for i in range(int(deadline * 10) + 40)]),
        ("headers complete, body of 1,000 bytes never sent",
         req("POST", "/predict", b"", [("Content-Length", "1000"), ("Content-Type", "image/png")])),
        ("headers sent, then nothing (stall)", [(0.0, f"GET /health HTTP/1.1\r\nHost: {host}\r\n".encode())]),
    ]
    rows = []
    for name, data in cases:
        r = exchange(port, data, timeout=deadline * 3 + 10)
        row = {"case": name, "outcome": summary(r["answer"]),
               "answer_s": None if r["answer_s"] is None else round(r["answer_s"], 3),
               "closed_after_s": None if r["closed_after_s"] is None else round(r["closed_after_s"], 3)}
        rows.append(row)
        log(f"(c) {name}: {row['outcome']}; answer after {row['answer_s']} s, closed after {row['closed_after_s']} s")
    page = exchange(port, req("GET", "/"), timeout=deadline * 3 + 10)["answer"]
    csp = re.search(rb"Content-Security-Policy: ([^\r]*)", page)
    rows.append({"case": "GET / (the page): Content-Security-Policy", "outcome":
                 "frame-ancestors 'none' present" if csp and b"frame-ancestors 'none'" in csp.group(1) else
                 "frame-ancestors missing", "answer_s": None, "closed_after_s": None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--deadline", type=float, default=5.0, help="the server's --request-deadline (s)")
    ap.add_argument("--max-connections", type=int, default=64)
    ap.add_argument("--uploads", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="200 connections, 4 uploads, no lifted-cap run")
    args = ap.parse_args()
    if args.quick:
        args.connections, args.uploads = 200, 4
    info = machine()
    print_machine(info)
    run, _ = write_run(scratch("bench-hostile"), arch="resnet18", size=224, classes=10)
    limits = ["--request-deadline", f"{args.deadline:g}", "--max-connections", str(args.max_connections)]

    port = free_port()
    proc = start_server(run, port, limits, print)
    try:
        stalled = stalled_connections(port, proc.pid, args.connections, args.deadline, args.max_connections, print)
        cases = hostile_cases(port, args.deadline, photo_jpeg(), print)
    finally:
        stop_server(proc)

    png = bomb_png()
    bombs = [concurrent_bombs(run, png, args.uploads, limits, print)]
    if not args.quick:
        bombs.append(concurrent_bombs(run, bomb_png(4096), args.uploads, limits, print))
        for decodes in (2, 4):
            bombs.append(concurrent_bombs(run, png, args.uploads, limits + ["--max-pixels", "50000000",
                                                                           "--max-decodes", str(decodes)], print))

    print("\n| case | outcome | answer after (s, from the last byte sent) | closed by the server after (s, from "
          "the connection's start) |\n|---|---|---:|---:|")
    for r in cases:
        print(f"| {r['case']} | {r['outcome']} | {'-' if r['answer_s'] is None else r['answer_s']} | "
              f"{'kept open' if r['closed_after_s'] is None else r['closed_after_s']} |")
    record("bench_hostile_server", {"machine": info, "args": vars(args), "stalled": stalled, "bombs": bombs,
                                    "cases": cases})
    ok = stalled["threads_within_cap"] and stalled["answers_within_deadline"]
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
