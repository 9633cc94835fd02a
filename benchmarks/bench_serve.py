"""Serving under load: ``resnetlab serve`` on loopback, concurrent clients, latency percentiles and throughput.

The server runs as its own process (``python -m resnetlab serve RUN --port P``) with a ResNet (default
ResNet-18 at 224x224, 1000 classes, seeded random weights: the cost of a real model, without its file). Each
client thread keeps one HTTP/1.1 connection and posts a JPEG (a 320x240 photo-like picture, so decoding and the
resize to 224 are part of every request) as multipart ``file``, one request after the other. Every request must
answer 200; latency is measured from sending to the last byte of the answer.

Configurations, each with the same requests: the server's batching on (``--max-batch 16``, 5 ms wait) and off
(``--max-batch 1``); then a few requests with ``?explain=1`` (Grad-CAM PNG in the answer). The batch sizes the
server formed come from its ``/health`` counters. Client and server share this machine's cores.

    .venv/bin/python benchmarks/bench_serve.py [--requests 200] [--clients 8] [--arch resnet18] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
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


def photo_jpeg(seed: int = 0) -> bytes:
    """A 320x240 JPEG with smooth gradients and some texture (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320]
    img = np.stack([128 + 100 * np.sin(x / 37 + c) * np.cos(y / 23 - c) for c in range(3)], axis=2)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def multipart(data: bytes, filename: str) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(port: int, path: str, timeout: float = 5.0) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def start_server(run: Path, port: int, max_batch: int, backend: str, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "resnetlab", "serve", str(run), "--port", str(port), "--max-batch", str(max_batch),
           "--backend", backend, "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 600:  # the first start may export the model to ONNX
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            health = get_json(port, "/health", timeout=2)
            log(f"server up in {time.perf_counter() - t0:.1f} s (backend {health['backend']}, max batch {max_batch})")
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start within 600 s")


def load(port: int, payload: bytes, requests: int, clients: int, query: str = "") -> dict:
    """``requests`` posts spread over ``clients`` threads with one keep-alive connection each."""
    body, ctype = multipart(payload, "photo.jpg")
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        try:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    conn.request("POST", f"/predict{query}", body=body, headers={"Content-Type": ctype})
                    r = conn.getresponse()
                    data = r.read()
                    ok = r.status == 200 and "top_k" in json.loads(data)
                except (OSError, http.client.HTTPException, ValueError) as e:
                    ok, data = False, repr(e).encode()
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                dt = time.perf_counter() - t0
                with lock:
                    (lat.append(dt) if ok else errors.append(data[:200].decode("utf-8", "replace")))
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1000 if lat else np.array([float("nan")])
    return {"requests": requests, "clients": clients, "ok": len(lat), "errors": len(errors),
            "error_examples": errors[:3], "wall_s": round(wall, 2), "req_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--explain-requests", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="40 requests, 8 explained")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.explain_requests = 40, 8
    info = machine()
    print_machine(info)
    run, _ = write_run(scratch("bench-serve"), arch=args.arch)
    payload = photo_jpeg()
    results = []
    configs = [("batching (max 16, 5 ms)", 16, ""), ("no batching (max 1)", 1, "")]
    if args.explain_requests:
        configs.append(("batching, ?explain=1", 16, "?explain=1"))
    for name, max_batch, query in configs:
        port = free_port()
        proc = start_server(run, port, max_batch, args.backend, print)
        try:
            n = args.explain_requests if query else args.requests
            load(port, payload, min(n, args.clients), args.clients, query)  # warm-up: one request per client
            before = get_json(port, "/health")
            res = load(port, payload, n, args.clients, query)
            after = get_json(port, "/health")
        finally:
            proc.terminate()
            proc.wait(30)
        sizes = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
        batches = after["batches"] - before["batches"]
        res.update(config=name, max_batch=max_batch, backend=after["backend"], batches=batches,
                   mean_batch=round(res["ok"] / batches, 2) if batches else None,
                   batch_sizes={k: v for k, v in sorted(sizes.items()) if v})
        results.append(res)
        print(f"{name}: {res['ok']}/{n} ok, {res['errors']} errors; {res['req_per_s']} req/s; p50 {res['p50_ms']} ms, "
              f"p95 {res['p95_ms']} ms, p99 {res['p99_ms']} ms; mean batch {res['mean_batch']}; load average "
              f"{[round(v, 2) for v in os.getloadavg()]}", flush=True)
        if res["errors"]:
            print(f"  errors: {res['error_examples']}")
    print("\n| configuration | requests | clients | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['config']} | {r['requests']} | {r['clients']} | {r['errors']} | {r['req_per_s']} | {r['p50_ms']} "
              f"| {r['p95_ms']} | {r['p99_ms']} | {r['mean_batch']} |")
    record("bench_serve", {"machine": info, "arch": args.arch, "payload_bytes": len(payload), "results": results})
    if any(r["errors"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
