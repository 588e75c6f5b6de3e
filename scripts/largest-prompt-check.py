#!/usr/bin/env python3
"""The server's memory and cancellation with the largest prompt its limits allow, and after a large image.

    python3 scripts/largest-prompt-check.py target/release/dreamshaper

Starts `BINARY serve` with the tiny model (models/tiny-sdxl, --open-ranges) on a free loopback port, then prints:
  - the RSS before any request and after a warm-up generation (the baseline: the first generation allocates the
    worker's lasting buffers);
  - a generation with a near-limit A1111 prompt (about 2,700 characters of distinct words, 15 `[a:b:N]` edits, so
    16 distinct texts of about 23 chunks each, and the same words as negative prompt; 16 steps, 64²): its status and
    time, and the RSS right after and 5 s later, against the baseline;
  - the same request with the client disconnecting 0.5 s in (during prompt encoding): how long after the disconnect
    the worker is idle (`/health` `running` false);
  - three 768² generations: the RSS after them, against the baseline (what glibc keeps in its arenas).
Standard library only; the server is terminated at the end.
"""
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

binary = sys.argv[1]
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = subprocess.Popen(
    [binary, "serve", "--model", "models/tiny-sdxl", "--addr", f"127.0.0.1:{port}", "--open-ranges"],
    stderr=subprocess.DEVNULL,
)
url = f"http://127.0.0.1:{port}"


def rss_mib():
    for line in open(f"/proc/{server.pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def post(body):
    request = urllib.request.Request(
        url + "/v1/sdxl1.0-dreamshaper", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    start = time.time()
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            answer.read()
            return f"{answer.status} in {time.time() - start:.2f} s"
    except urllib.error.HTTPError as e:
        return f"{e.code} in {time.time() - start:.2f} s: {e.read()[:200]!r}"


def health():
    with urllib.request.urlopen(url + "/health", timeout=10) as answer:
        return json.load(answer)


try:
    for _ in range(300):
        try:
            health()
            break
        except OSError:
            time.sleep(0.2)
    small = {"prompt": "a cat", "scheduler": "Euler", "num_inference_steps": 1, "img_width": 64, "img_height": 64,
             "seed": 1, "guidance_scale": 0}
    print(f"RSS before any request: {rss_mib():.1f} MiB")
    post(small)
    time.sleep(1)
    baseline = rss_mib()
    print(f"RSS after a warm-up generation (baseline): {baseline:.1f} MiB")

    words = " ".join(f"word{i}" for i in range(330))
    edits = " ".join(f"[a{i}:b{i}:{i + 1}]" for i in range(15))
    largest = dict(small, prompt=f"{words} {edits}", negative_prompt=words, num_inference_steps=16, guidance_scale=5)
    print(f"near-limit prompt ({len(largest['prompt'])} characters): {post(largest)}")
    print(f"  RSS right after: {rss_mib():.1f} MiB")
    time.sleep(5)
    print(f"  RSS 5 s later: {rss_mib():.1f} MiB ({rss_mib() / baseline - 1:+.1%} vs baseline)")

    data = json.dumps(largest).encode()
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(
        f"POST /v1/sdxl1.0-dreamshaper HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n\r\n".encode() + data
    )
    time.sleep(0.5)
    running = health()["running"]
    client.close()
    disconnected = time.time()
    while health()["running"] and time.time() - disconnected < 120:
        time.sleep(0.005)
    print(f"disconnect 0.5 s in (running then: {running}): worker idle {time.time() - disconnected:.3f} s later")

    for _ in range(3):
        post(dict(small, img_width=768, img_height=768, num_inference_steps=2))
    time.sleep(1)
    print(f"after three 768² generations: RSS {rss_mib():.1f} MiB ({rss_mib() / baseline - 1:+.1%} vs baseline)")
finally:
    server.terminate()
    server.wait()
