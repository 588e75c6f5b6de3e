#!/usr/bin/env python3
"""Black-box resource-exhaustion measurements of `dreamshaper serve` (hostile / careless clients).

Python 3 standard library only. Loopback only. It starts the server itself (one instance at a time, a fresh one per
phase), measures it from outside (HTTP over raw sockets, RSS from /proc/PID/status) and kills it and closes every
socket on exit.

    python3 scripts/hostile-clients.py --binary target/release/dreamshaper \
        [--model models/tiny-sdxl] [--only fd,slowloris,prompt,rss] [--json out.json]

Servers are started as `BINARY serve --model MODEL --addr 127.0.0.1:PORT --open-ranges` (+ `--max-body-bytes 4000000`
for the prompt/rss phases, so a 1 MB prompt passes the body limit and reaches the prompt checks). The script raises its
own soft fd limit to the hard one; the fd phase's server runs under `ulimit -n 1024`, the others inherit the raised
limit. A "small generation" is `POST /v1/sdxl1.0-dreamshaper` {"prompt":"a cat","seed":1,"num_inference_steps":1,
"img_width":64,"img_height":64,"scheduler":"Euler","guidance_scale":0} (answer: image/jpeg).

Figures (a request that gets no complete answer within its client timeout reads "timed out (> N s)"):

fd (server under `ulimit -n 1024`):
  * small: 1,100 silent connections (connect, send nothing; opened 50 per 50 ms: a burst overflows the listen backlog
    and, with SYN cookies, leaves "connected" clients the server does not know of yet, so the figures would depend
    on the machine's load). `server fds` = entries of /proc/PID/fd once that count has settled; `server-side tcp`
    (from /proc/net/tcp) = the listener's accept queue and the established / SYN_RECV connections to the port;
    `connections / idle / open | connecting | closed by server` as the clients see them (`connecting`: SYN not
    answered, the backlog is full; `closed by server`: EOF or reset, the HTTP status the server sent first, if any,
    counted under `statuses sent by server`). Then `probes`: 5 `GET /health` (started 1 s apart, concurrently, each
    with a 40 s timeout: status and seconds each) and one small generation (40 s timeout), concurrently with them.
  * `after closing: recovery`: seconds from closing them until `/health` answers 200 again (polled with 2 s
    timeouts, capped at 60 s) and that answer's latency.
  * big: 300 slow-header clients (each sends `POST /v1/sdxl1.0-dreamshaper HTTP/1.1\r\nHost: x\r\nX-a: ` and then
    3 more `a` bytes every second, never ending the header), then 5,000 silent connections; the same figures while
    they are open; then all closed: `recovery` as above and one more small generation.
  Server-side closes (timeouts, eviction) are normal for a fixed server: counted, never fatal.

slowloris (fresh server): baseline VmRSS; 2,000 connections each sending `POST ... HTTP/1.1\r\nHost: x\r\nX-Pad: `
  followed by ~300 KB of `a` in 16 KB pieces as fast as the server takes them, never finishing the header.
  `peak RSS growth` = highest sampled VmRSS (every 0.2 s) minus baseline, and VmHWM growth; how many finished
  sending their 300 KB, how many the server closed (and the statuses it answered, e.g. 431). Then all closed, 5 s
  wait: VmRSS vs baseline and whether it is back within 10 % of the baseline.

prompt (fresh server with --max-body-bytes 4000000, 120 s client timeout per request):
  * 1 MB prompt ("a cat, " repeated), 1 step, 64x64, guidance 0, Euler: status (+ error message when not 200),
    seconds, VmHWM growth over the pre-request VmHWM (VmHWM is the process-lifetime peak; the server is fresh),
    highest sampled VmRSS during the request (and VmRSS just before it), VmRSS right after the answer and 5 s later.
  * 11 KB and 41 KB prompts with 100 A1111 prompt edits `[catN:dogN:F]` (F = 0.01, 0.02, ... 1.00) padded with
    words to the size, 100 steps, 64x64, guidance 0: status, seconds, VmRSS before, sampled peak VmRSS, VmRSS after
    (their VmHWM growth reads 0 when the 1 MB prompt's peak was higher).
  * disconnect: the 1 MB prompt request again, the client disconnects 3 s after sending it; `/health` is polled
    (field `running`) and `idle after disconnect` is the seconds from the disconnect until `running` is false
    (capped at 120 s; "never ran" when the request was answered before the disconnect); `running at disconnect`
    and the health `cancelled` counter before / after.
rss (same server as prompt, or a fresh one with --only rss): VmRSS before any generation request (after start),
  after the prompt phase's requests (worker idle), and after one more small generation (and 5 s later).

Run time: about 1.5 min against a server that answers; about 5-6 min against one that hangs (the fd probes wait out
their 40 s timeouts twice; the 1 MB and 100-edit prompts take minutes on a slow server). Progress goes to stderr,
the table to stdout.
"""

import argparse
import collections
import errno
import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HOST = "127.0.0.1"
GEN_PATH = "/v1/sdxl1.0-dreamshaper"
SMALL_GEN = {"prompt": "a cat", "seed": 1, "num_inference_steps": 1, "img_width": 64, "img_height": 64,
             "scheduler": "Euler", "guidance_scale": 0}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# /proc

def proc_status(pid):
    """VmRSS and VmHWM of PID in MiB (None when gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) / 1024.0
    except OSError:
        return {"VmRSS": None, "VmHWM": None}
    return out


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def listener_state(port):
    """From /proc/net/tcp: the listening socket's accept-queue length, and how many connections to `port` are
    established / half-open (SYN_RECV) on the server side."""
    out = {"accept queue": None, "established": 0, "syn_recv": 0}
    hexport = f"{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                local, st = parts[1], parts[3]
                if local.split(":")[1] != hexport:
                    continue
                if st == "0A":
                    out["accept queue"] = int(parts[4].split(":")[1], 16)
                elif st == "01":
                    out["established"] += 1
                elif st == "03":
                    out["syn_recv"] += 1
    except OSError:
        pass
    return out


def settle(pid, max_s=10.0, quiet=1.5):
    """Waits until the server's open-fd count has not changed for `quiet` s (or max_s); returns it."""
    t0 = time.monotonic()
    last, since = open_fds(pid), time.monotonic()
    while time.monotonic() - t0 < max_s:
        time.sleep(0.25)
        n = open_fds(pid)
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


class RssSampler:
    """Samples the server's VmRSS every `period` s in a thread; `.peak` is the highest seen."""

    def __init__(self, pid, period=0.2):
        self.pid, self.period, self.peak = pid, period, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            r = proc_status(self.pid)["VmRSS"]
            if r is not None and r > self.peak:
                self.peak = r
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


# ---------------------------------------------------------------------------------------------------------------------
# HTTP over a raw socket, with one overall deadline

def http_request(port, method, path, body=None, timeout=40.0, headers=None, hold=None):
    """One request with `Connection: close`. Returns {status, seconds, content_type, body, error}.

    `hold`: a callable given the connected socket after the request is sent (the disconnect test); when it returns
    False the socket is closed without reading the answer."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    res = {"status": None, "seconds": None, "content_type": None, "body": b"", "error": None}
    s = None
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((HOST, port))
        h = {"Host": f"{HOST}:{port}", "Connection": "close"}
        if body is not None:
            h["Content-Type"] = "application/json"
            h["Content-Length"] = str(len(body))
        h.update(headers or {})
        req = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        data = req.encode() + (body or b"")
        view = memoryview(data)
        while view:
            s.settimeout(max(0.001, deadline - time.monotonic()))
            n = s.send(view)
            view = view[n:]
        if hold is not None and not hold(s):
            res["error"] = "client disconnected"
            res["seconds"] = time.monotonic() - t0
            return res
        buf = b""
        head_end = -1
        length = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if head_end < 0:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    head = buf[:head_end].decode("latin-1").split("\r\n")
                    res["status"] = int(head[0].split()[1])
                    for line in head[1:]:
                        k, _, v = line.partition(":")
                        if k.strip().lower() == "content-length":
                            length = int(v.strip())
                        elif k.strip().lower() == "content-type":
                            res["content_type"] = v.strip()
            if head_end >= 0 and length is not None and len(buf) - head_end - 4 >= length:
                break
        if head_end >= 0:
            res["body"] = buf[head_end + 4:]
        else:
            res["error"] = "closed without an answer" if not buf else "incomplete answer"
    except (socket.timeout, TimeoutError):
        res["error"] = f"timed out (> {timeout:g} s)"
    except OSError as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        if s is not None:
            s.close()
    if res["seconds"] is None:
        res["seconds"] = time.monotonic() - t0
    return res


def summarize(res):
    """A JSON-friendly record of an answer (the error message of a non-200 JSON answer, not the image)."""
    out = {"status": res["status"], "seconds": round(res["seconds"], 3)}
    if res["error"]:
        out["error"] = res["error"]
    if res["status"] is not None:
        out["content_type"] = res["content_type"]
        if res["status"] != 200 or not (res["content_type"] or "").startswith("image/"):
            text = res["body"][:400].decode("utf-8", "replace")
            try:
                j = json.loads(res["body"])
                text = j.get("error", j.get("message", text)) if isinstance(j, dict) else text
                if isinstance(text, dict):
                    text = text.get("message", json.dumps(text))
            except ValueError:
                pass
            out["message"] = str(text)[:300]
        else:
            out["bytes"] = len(res["body"])
    return out


def fmt(rec):
    if rec is None:
        return "-"
    if rec.get("status") is None:
        return rec.get("error", "no answer") + f" after {rec['seconds']:.1f} s"
    s = f"{rec['status']} in {rec['seconds']:.3f} s"
    if rec.get("message") and rec["status"] != 200:
        s += f" ({rec['message'][:120]})"
    elif "bytes" in rec:
        s += f" ({rec['content_type']}, {rec['bytes']} B)"
    return s


def gen_body(prompt, steps=1):
    b = dict(SMALL_GEN)
    b["prompt"] = prompt
    b["num_inference_steps"] = steps
    return json.dumps(b).encode()


# ---------------------------------------------------------------------------------------------------------------------
# the server

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, model, extra=(), nofile=None, tmpdir="."):
        self.port = free_port()
        self.args = [binary, "serve", "--model", model, "--addr", f"{HOST}:{self.port}", "--open-ranges", *extra]
        self.nofile = nofile
        self.log_path = os.path.join(tmpdir, f"server-{self.port}.log")
        self.proc = None

    def start(self, timeout=180):
        logf = open(self.log_path, "wb")
        if self.nofile:
            cmd = ["bash", "-c", f'ulimit -n {int(self.nofile)} && exec "$@"', "bash", *self.args]
        else:
            cmd = self.args
        log("starting:", " ".join(self.args), f"(ulimit -n {self.nofile})" if self.nofile else "")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        logf.close()
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}) while starting:\n{self.log_tail()}")
            r = http_request(self.port, "GET", "/health", timeout=2)
            if r["status"] == 200:
                log(f"server up (pid {self.proc.pid}, port {self.port}) after {time.monotonic() - t0:.1f} s")
                return
            time.sleep(0.3)
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log_tail()}")

    @property
    def pid(self):
        return self.proc.pid

    def rss(self):
        return proc_status(self.proc.pid)

    def health(self, timeout=5):
        r = http_request(self.port, "GET", "/health", timeout=timeout)
        if r["status"] == 200:
            try:
                return json.loads(r["body"])
            except ValueError:
                return None
        return None

    def wait_idle(self, timeout=120):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            h = self.health()
            if h is not None and not h.get("running") and not h.get("queue_length"):
                return time.monotonic() - t0
            time.sleep(0.25)
        return None

    def log_tail(self, n=20):
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        log(f"server (pid {self.proc.pid}) stopped")


# ---------------------------------------------------------------------------------------------------------------------
# a crowd of hostile connections driven by one epoll thread

class Conn:
    __slots__ = ("sock", "kind", "state", "payload", "sent", "resp", "done")

    def __init__(self, sock, kind, payload):
        self.sock, self.kind, self.payload = sock, kind, payload
        self.state = "connecting"
        self.sent = 0
        self.resp = b""
        self.done = False


class Crowd:
    """kinds: `idle` (sends nothing), `slow` (header prefix, then `trickle` bytes every second),
    `pad` (header prefix + a long header line in 16 KB pieces as fast as the socket takes them, never finished)."""

    SLOW_PREFIX = f"POST {GEN_PATH} HTTP/1.1\r\nHost: x\r\nX-a: ".encode()
    PAD_PREFIX = f"POST {GEN_PATH} HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode()

    def __init__(self, port, trickle=3, piece=16 * 1024):
        self.port, self.trickle, self.piece = port, trickle, piece
        self.ep = select.epoll()
        self.conns = {}
        self.closed = []  # conns the server closed (sockets already closed)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def add(self, kind, n, pad_bytes=0, batch=50, pause=0.05):
        payload = None
        if kind == "pad":
            payload = self.PAD_PREFIX + b"a" * pad_bytes
        failed = 0
        for i in range(n):
            if i and i % batch == 0:
                time.sleep(pause)  # paced: a burst overflows the listen backlog (SYN cookies: "connected" clients
                # the server does not know of yet), which makes the figures depend on the machine's load
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((HOST, self.port))
            if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
                s.close()
                failed += 1
                continue
            with self.lock:
                c = Conn(s, kind, payload)
                self.conns[s.fileno()] = c
                self.ep.register(s.fileno(), select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)
        return failed

    def _server_closed(self, fd, c, how):
        c.state = how
        try:
            self.ep.unregister(fd)
        except OSError:
            pass
        c.sock.close()
        del self.conns[fd]
        self.closed.append(c)

    def _send(self, fd, c, data):
        try:
            n = c.sock.send(data)
            c.sent += n
            return n
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            self._server_closed(fd, c, "closed by server")
            return -1

    def _run(self):
        last_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                events = self.ep.poll(0.2)
            except OSError:
                return
            with self.lock:
                for fd, ev in events:
                    c = self.conns.get(fd)
                    if c is None:
                        continue
                    if c.state == "connecting":
                        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            c.state = "connect failed"
                            self.ep.unregister(fd)
                            c.sock.close()
                            del self.conns[fd]
                            self.closed.append(c)
                            continue
                        if not ev & select.EPOLLOUT:
                            continue
                        c.state = "open"
                        if c.kind == "slow":
                            if self._send(fd, c, Crowd.SLOW_PREFIX) < 0:
                                continue
                        if c.kind != "pad":
                            self.ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
                    if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                        try:
                            data = c.sock.recv(4096)
                        except (BlockingIOError, InterruptedError):
                            data = None
                        except OSError:
                            self._server_closed(fd, c, "closed by server")
                            continue
                        if data == b"":
                            self._server_closed(fd, c, "closed by server")
                            continue
                        if data:
                            c.resp = (c.resp + data)[:256]
                    if c.kind == "pad" and not c.done and ev & select.EPOLLOUT:
                        rest = c.payload[c.sent:c.sent + self.piece]
                        if self._send(fd, c, rest) < 0:
                            continue
                        if c.sent >= len(c.payload):
                            c.done = True
                            self.ep.modify(fd, select.EPOLLIN | select.EPOLLRDHUP)
                now = time.monotonic()
                if now - last_tick >= 1.0:
                    last_tick = now
                    for fd, c in list(self.conns.items()):
                        if c.kind == "slow" and c.state == "open":
                            self._send(fd, c, b"a" * self.trickle)

    def stats(self):
        with self.lock:
            st = collections.Counter()
            statuses = collections.Counter()
            pad_done = 0
            for c in list(self.conns.values()) + self.closed:
                st[(c.kind, c.state)] += 1
                if c.kind == "pad" and c.done:
                    pad_done += 1
                if c.resp.startswith(b"HTTP/"):
                    try:
                        statuses[c.resp.split(b" ", 2)[1].decode()] += 1
                    except IndexError:
                        pass
            out = {}
            for (kind, state), n in sorted(st.items()):
                out.setdefault(kind, {})[state] = n
            if statuses:
                out["statuses sent by server"] = dict(statuses)
            if pad_done:
                out["pad: finished sending"] = pad_done
            return out

    def wait_connected(self, max_s):
        """Until no socket is still connecting, or max_s."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < max_s:
            with self.lock:
                if not any(c.state == "connecting" for c in self.conns.values()):
                    break
            time.sleep(0.2)

    def close(self):
        self._stop.set()
        self._t.join()
        with self.lock:
            for c in self.conns.values():
                try:
                    c.sock.close()
                except OSError:
                    pass
            self.conns.clear()
        self.ep.close()


# ---------------------------------------------------------------------------------------------------------------------
# phases

def concurrent_probes(port, tries=5, timeout=40.0, stagger=1.0):
    """`tries` GET /health (started `stagger` s apart) and one small generation, all concurrently."""
    results = {}

    def health(i):
        time.sleep(i * stagger)
        results[f"health {i + 1}"] = summarize(http_request(port, "GET", "/health", timeout=timeout))

    def gen():
        results["generation"] = summarize(
            http_request(port, "POST", GEN_PATH, json.dumps(SMALL_GEN).encode(), timeout=timeout))

    ts = [threading.Thread(target=health, args=(i,)) for i in range(tries)] + [threading.Thread(target=gen)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {k: results[k] for k in [f"health {i + 1}" for i in range(tries)] + ["generation"]}


def recovery(port, cap=60.0):
    """Seconds until /health answers 200 again (polled with 2 s timeouts), and that answer's latency."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < cap:
        r = http_request(port, "GET", "/health", timeout=2)
        if r["status"] == 200:
            return {"seconds until 200": round(time.monotonic() - t0, 3), "health latency": round(r["seconds"], 3)}
        time.sleep(0.2)
    return {"seconds until 200": f"> {cap:g}", "health latency": None}


def phase_fd(args, tmp, res):
    srv = Server(args.binary, args.model, nofile=1024, tmpdir=tmp)
    out = res["fd"] = {}
    crowd = None
    try:
        srv.start()
        out["baseline health"] = summarize(http_request(srv.port, "GET", "/health", timeout=5))
        out["server fds at start"] = open_fds(srv.pid)

        # --- 1,100 silent connections
        crowd = Crowd(srv.port)
        crowd.add("idle", 1100)
        crowd.wait_connected(5)
        small = out["small: 1100 idle"] = {"server fds": settle(srv.pid)}
        small["server-side tcp"] = listener_state(srv.port)
        log("fd: 1,100 idle open; probing /health and a generation (up to ~45 s)")
        small["probes"] = concurrent_probes(srv.port)
        small["connections"] = crowd.stats()
        crowd.close()
        crowd = None
        small["after closing: recovery"] = recovery(srv.port)
        log("fd: recovered:", small["after closing: recovery"])

        # --- 300 slow-header clients + 5,000 silent connections
        crowd = Crowd(srv.port)
        crowd.add("slow", 300)
        crowd.wait_connected(3)
        crowd.add("idle", 5000)
        crowd.wait_connected(8)
        big = out["big: 5000 idle + 300 slow"] = {"server fds": settle(srv.pid)}
        big["server-side tcp"] = listener_state(srv.port)
        log("fd: 5,000 idle + 300 slow open; probing (up to ~45 s)")
        big["probes"] = concurrent_probes(srv.port)
        big["connections"] = crowd.stats()
        crowd.close()
        crowd = None
        big["after closing: recovery"] = recovery(srv.port)
        big["after closing: generation"] = summarize(
            http_request(srv.port, "POST", GEN_PATH, json.dumps(SMALL_GEN).encode(), timeout=40))
        out["server alive at end"] = srv.proc.poll() is None
        out["rss MiB at end"] = {k: round(v, 1) for k, v in srv.rss().items() if v is not None}
    finally:
        if crowd is not None:
            crowd.close()
        srv.stop()


def phase_slowloris(args, tmp, res):
    srv = Server(args.binary, args.model, tmpdir=tmp)
    out = res["slowloris"] = {}
    crowd = None
    try:
        srv.start()
        http_request(srv.port, "GET", "/health", timeout=5)
        base = srv.rss()
        out["baseline VmRSS MiB"] = round(base["VmRSS"], 1)
        out["baseline VmHWM MiB"] = round(base["VmHWM"], 1)
        with RssSampler(srv.pid) as sampler:
            crowd = Crowd(srv.port)
            t0 = time.monotonic()
            crowd.add("pad", 2000, pad_bytes=300 * 1024)
            log("slowloris: 2,000 connections sending 300 KB headers (capped at 60 s)")
            while time.monotonic() - t0 < 60:
                with crowd.lock:
                    busy = sum(1 for c in crowd.conns.values() if not c.done)
                if busy == 0:
                    break
                time.sleep(0.5)
            out["sending seconds"] = round(time.monotonic() - t0, 1)
            time.sleep(3)
            out["connections"] = crowd.stats()
            out["health while open"] = summarize(http_request(srv.port, "GET", "/health", timeout=10))
            now = srv.rss()
        out["VmRSS MiB while open"] = round(now["VmRSS"], 1)
        out["peak VmRSS growth MiB (sampled)"] = round(sampler.peak - base["VmRSS"], 1)
        out["VmHWM growth MiB"] = round(now["VmHWM"] - base["VmHWM"], 1)
        crowd.close()
        crowd = None
        time.sleep(5)
        after = srv.rss()["VmRSS"]
        out["VmRSS MiB 5 s after closing"] = round(after, 1)
        out["vs baseline"] = f"{(after / base['VmRSS'] - 1) * 100:+.1f} %"
        out["returns within 10 %"] = after <= base["VmRSS"] * 1.10
        out["server alive at end"] = srv.proc.poll() is None
    finally:
        if crowd is not None:
            crowd.close()
        srv.stop()


def edit_prompt(size):
    edits = " ".join(f"[cat{i}:dog{i}:{(i + 1) / 100:.2f}]" for i in range(100))
    words = ", a detailed oil painting of a quiet harbour at dawn"
    p = edits
    while len(p) < size:
        p += words
    return p[:size]


def timed_generation(srv, body, timeout):
    before = srv.rss()
    with RssSampler(srv.pid, period=0.1) as s:
        r = http_request(srv.port, "POST", GEN_PATH, body, timeout=timeout)
    after = srv.rss()
    rec = summarize(r)
    rec["VmRSS MiB before"] = round(before["VmRSS"], 1)
    rec["peak VmRSS MiB (sampled)"] = round(s.peak, 1)
    rec["VmHWM growth MiB"] = round(after["VmHWM"] - before["VmHWM"], 1)
    rec["VmRSS MiB right after"] = round(after["VmRSS"], 1) if after["VmRSS"] else None
    return rec


def phase_prompt_rss(args, tmp, res, do_prompt, do_rss):
    srv = Server(args.binary, args.model, extra=["--max-body-bytes", "4000000"], tmpdir=tmp)
    T = args.request_timeout
    try:
        srv.start()
        http_request(srv.port, "GET", "/health", timeout=5)
        base = srv.rss()
        if do_prompt:
            out = res["prompt"] = {"VmRSS MiB at start": round(base["VmRSS"], 1),
                                   "VmHWM MiB at start": round(base["VmHWM"], 1)}
            big = ("a cat, " * (1_000_000 // 7 + 1))[:1_000_000]
            log(f"prompt: 1 MB prompt ({T:g} s timeout)")
            rec = out["1 MB prompt, 1 step"] = timed_generation(srv, gen_body(big, 1), T)
            if rec["status"] is None:
                rec["worker idle after"] = srv.wait_idle(T)
            time.sleep(5)
            rec["VmRSS MiB 5 s after"] = round(srv.rss()["VmRSS"], 1)
            log("prompt:", fmt(rec))
            for size in (11_000, 41_000):
                p = edit_prompt(size)
                log(f"prompt: {size // 1000} KB prompt with 100 edits at 100 steps ({T:g} s timeout)")
                rec = out[f"{size // 1000} KB, 100 edits, 100 steps"] = timed_generation(srv, gen_body(p, 100), T)
                rec["prompt bytes"] = len(p)
                if rec["status"] is None:
                    rec["worker idle after"] = srv.wait_idle(T)
                log("prompt:", fmt(rec))

            # disconnect test
            log("prompt: disconnect test (1 MB prompt, client leaves after 3 s)")
            d = out["disconnect after 3 s (1 MB prompt)"] = {}
            marks = {}

            def hold(sock):
                # refused early (an answer already there)? then it never reached the worker
                sock.settimeout(3)
                try:
                    peek = sock.recv(64, socket.MSG_PEEK)
                    marks["answered before disconnect"] = peek[:12].decode("latin-1")
                except (socket.timeout, TimeoutError):
                    pass
                except OSError:
                    pass
                h = srv.health()
                marks["running at disconnect"] = bool(h and h.get("running"))
                marks["cancelled before"] = h.get("cancelled") if h else None
                return False

            http_request(srv.port, "POST", GEN_PATH, gen_body(big, 1), timeout=T, hold=hold)
            t_disc = time.monotonic()
            d.update(marks)
            idle = None
            while time.monotonic() - t_disc < T:
                h = srv.health(timeout=5)
                if h is not None and not h.get("running") and not h.get("queue_length"):
                    idle = time.monotonic() - t_disc
                    d["cancelled after"] = h.get("cancelled")
                    break
                time.sleep(0.25)
            if marks.get("answered before disconnect"):
                d["idle after disconnect s"] = "never ran (answered before the disconnect)"
            else:
                d["idle after disconnect s"] = round(idle, 2) if idle is not None else f"> {T:g}"
            log("prompt: disconnect:", d)
        if do_rss:
            out = res["rss"] = {"VmRSS MiB before any request": round(base["VmRSS"], 1)}
            srv.wait_idle(T)
            now = srv.rss()
            out["VmRSS MiB after the prompt phase" if do_prompt else "VmRSS MiB (no prompt phase run)"] = \
                round(now["VmRSS"], 1)
            out["vs before"] = f"{(now['VmRSS'] / base['VmRSS'] - 1) * 100:+.1f} %"
            r = http_request(srv.port, "POST", GEN_PATH, json.dumps(SMALL_GEN).encode(), timeout=T)
            out["small generation"] = summarize(r)
            out["VmRSS MiB after a small generation"] = round(srv.rss()["VmRSS"], 1)
            time.sleep(5)
            after = srv.rss()
            out["VmRSS MiB 5 s later"] = round(after["VmRSS"], 1)
            out["vs before (5 s later)"] = f"{(after['VmRSS'] / base['VmRSS'] - 1) * 100:+.1f} %"
            out["VmHWM MiB (lifetime peak)"] = round(after["VmHWM"], 1)
        res["prompt" if do_prompt else "rss"]["server alive at end"] = srv.proc.poll() is None
    finally:
        srv.stop()


# ---------------------------------------------------------------------------------------------------------------------
# output

def table(res):
    lines = []

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict) and not ("status" in v and "seconds" in v):
                walk(v, prefix + [k])
            else:
                name = " / ".join(prefix[1:] + [k])
                if isinstance(v, dict):
                    extra = {x: y for x, y in v.items()
                             if x not in ("status", "seconds", "error", "message", "content_type", "bytes")}
                    val = fmt(v) + ("; " + ", ".join(f"{x}: {y}" for x, y in extra.items()) if extra else "")
                elif isinstance(v, float):
                    val = f"{v:g}"
                else:
                    val = str(v)
                lines.append((prefix[0] if prefix else "", name, val))

    for phase, d in res.items():
        if isinstance(d, dict):
            walk(d, [phase])
        else:
            lines.append(("", phase, str(d)))
    w0 = max((len(a) for a, _, _ in lines), default=5)
    w1 = min(60, max((len(b) for _, b, _ in lines), default=6))
    out = [f"{'phase':<{w0}}  {'figure':<{w1}}  value", "-" * (w0 + w1 + 60)]
    last = None
    for a, b, c in lines:
        out.append(f"{(a if a != last else ''):<{w0}}  {b:<{w1}}  {c}")
        last = a
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True, help="the dreamshaper binary")
    ap.add_argument("--model", default="models/tiny-sdxl")
    ap.add_argument("--only", default="fd,slowloris,prompt,rss", help="comma-separated phases: fd,slowloris,prompt,rss")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="client timeout of each prompt/rss phase request (s)")
    args = ap.parse_args()
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(phases) - {"fd", "slowloris", "prompt", "rss"}
    if unknown:
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")
    args.binary = os.path.abspath(args.binary)
    if not os.path.exists(args.model):
        ap.error(f"no model at {args.model}")
    args.model = os.path.abspath(args.model)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    res = {"run": {"binary": args.binary, "model": args.model, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "client fd limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        try:
            for name, fn in (("fd", phase_fd), ("slowloris", phase_slowloris)):
                if name in phases:
                    p0 = time.monotonic()
                    try:
                        fn(args, tmp, res)
                    except Exception as e:  # one phase failing must not lose the others' figures
                        res.setdefault(name, {})["phase error"] = f"{type(e).__name__}: {e}"
                        log(f"{name}: phase error: {e}")
                    res[name]["phase seconds"] = round(time.monotonic() - p0, 1)
            if "prompt" in phases or "rss" in phases:
                p0 = time.monotonic()
                try:
                    phase_prompt_rss(args, tmp, res, "prompt" in phases, "rss" in phases)
                except Exception as e:
                    res.setdefault("prompt" if "prompt" in phases else "rss", {})["phase error"] = \
                        f"{type(e).__name__}: {e}"
                    log(f"prompt/rss: phase error: {e}")
                res.setdefault("prompt" if "prompt" in phases else "rss", {})["phase seconds"] = \
                    round(time.monotonic() - p0, 1)
        finally:
            res["run"]["total seconds"] = round(time.monotonic() - t0, 1)
            print(table(res))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(res, f, indent=2, default=str)


if __name__ == "__main__":
    main()
