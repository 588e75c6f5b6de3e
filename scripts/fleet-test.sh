#!/usr/bin/env bash
# Fleet test: two `dreamshaper serve` replicas (the tiny model, `--allowed-hosts images.example.com`) behind nginx
# running deploy/nginx.conf itself (only its ports and log path substituted), a bounded load through nginx with the
# public Host name, one replica killed mid-run. Fails (exit 1) on:
#   - a request that hung (no answer within the client's timeout),
#   - a failure that is not an explicit 5xx or 429 from the fleet (a reset or closed connection, an empty reply, a
#     4xx, a 200 that is not a JPEG),
#   - the surviving replica not serving after the kill (requests started after it, then a sequential check),
#   - images for the same seed that differ: between the replicas asked directly, through nginx, or in the load.
# When redis-server is installed (Debian: apt-get install redis-server; FLEET_REDIS=0 skips it), the replicas share
# their v2 jobs in a Redis of the test's own (`--job-store`), and the v2 job API is checked as one service: jobs
# submitted through nginx or to one replica, polled and fetched on the other, images equal to v1's for the seed,
# one cancelled across replicas, and after the kill a job submitted through nginx is run by the survivor.
# Prints every outcome (status -> count) and the timings. Loopback only, free ports, everything (nginx's config, pid,
# logs and temporary files, the replicas' logs) in one temporary directory, every process stopped on exit.
#
#   scripts/fleet-test.sh            # needs nginx (Debian: apt-get install nginx-light) and python3
#
# Knobs (environment): FLEET_REQUESTS (200), FLEET_CLIENTS (8), FLEET_KILL_AFTER (completed requests before the
# kill, 60), FLEET_KILL_SIGNAL (KILL: a crash; TERM: a graceful shutdown), FLEET_CLIENT_TIMEOUT (seconds, 60),
# FLEET_KEEP=1 keeps the temporary directory. The binary is ${CARGO_TARGET_DIR:-target}/release/dreamshaper
# (built with `cargo build --release` when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

requests=${FLEET_REQUESTS:-200}
clients=${FLEET_CLIENTS:-8}
kill_after=${FLEET_KILL_AFTER:-60}
kill_signal=${FLEET_KILL_SIGNAL:-KILL}
client_timeout=${FLEET_CLIENT_TIMEOUT:-60}
model=models/tiny-sdxl
bin=${CARGO_TARGET_DIR:-target}/release/dreamshaper
conf_src=deploy/nginx.conf
started=$SECONDS

say() { echo "fleet-test: $*"; }
die() {
    echo "fleet-test: FAIL: $*" >&2
    exit 1
}

nginx_bin=$(command -v nginx || true)
[ -n "$nginx_bin" ] || nginx_bin=$(ls /usr/sbin/nginx 2>/dev/null || true)
[ -n "$nginx_bin" ] || die "nginx is not installed (Debian: apt-get install nginx-light)"
command -v python3 >/dev/null || die "python3 is not installed"
if [ ! -x "$bin" ]; then
    say "building $bin (cargo build --release)"
    cargo build --release
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/fleet-test.XXXXXX")
replica_pids=()
nginx_pid=
redis_pid=
load_pid=

# Stops what this script started, by process id: the load, the replicas, then nginx (TERM: a fast shutdown that also
# stops its workers; KILL for the master and its workers if it has not exited within 5 s).
cleanup() {
    local status=$? pid workers
    trap - EXIT INT TERM
    [ -n "$load_pid" ] && kill -TERM "$load_pid" 2>/dev/null # timeout(1) passes it on to the load
    for pid in "${replica_pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    [ -n "$redis_pid" ] && kill -KILL "$redis_pid" 2>/dev/null
    if [ -n "$nginx_pid" ]; then
        workers=$(ps -o pid= --ppid "$nginx_pid" 2>/dev/null || true)
        kill -TERM "$nginx_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$nginx_pid" 2>/dev/null || break
            sleep 0.1
        done
        for pid in $nginx_pid $workers; do
            kill -KILL "$pid" 2>/dev/null || true
        done
    fi
    wait 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        for log in "$work"/replica-*.log "$work"/error.log; do
            [ -s "$log" ] && { echo "--- last lines of $log" >&2; tail -n 15 "$log" >&2; }
        done
    fi
    if [ "${FLEET_KEEP:-0}" = 1 ]; then
        echo "fleet-test: kept $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The HTTP side (free ports, readiness, the load and its checks), Python 3 standard library only.
cat >"$work/fleet.py" <<'PY'
import hashlib, http.client, json, os, re, signal, socket, sys, threading, time
from collections import Counter, defaultdict

PATH = "/v1/sdxl1.0-dreamshaper"

def body(seed):
    return json.dumps({"prompt": "a photo of a Grumpy cat, 8k", "seed": seed, "num_inference_steps": 2,
                       "img_width": 64, "img_height": 64, "scheduler": "Euler", "guidance_scale": 7.5,
                       "base64": False}).encode()

# The public name: deploy/nginx.conf's server_name, which the replicas accept (--allowed-hosts).
PUBLIC_HOST = "images.example.com"

def request(port, method, path, data=None, timeout=10.0, host=None):
    """(status, headers, body), or (what went wrong, None, None): 'hung ...' on a client timeout, else the exception."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if host:
            headers["Host"] = host
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except (socket.timeout, TimeoutError):
        return "hung (no answer within the client timeout)", None, None
    except Exception as e:
        return type(e).__name__, None, None
    finally:
        conn.close()

def generate(port, seed, timeout, host=None):
    return request(port, "POST", PATH, body(seed), timeout, host)

def is_image(status, headers, data):
    return status == 200 and headers.get("content-type") == "image/jpeg" and data[:2] == b"\xff\xd8"

def ports(n):
    socks = [socket.socket() for _ in range(int(n))]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()

def wait_ready(port, pid, limit):
    deadline = time.monotonic() + float(limit)
    while time.monotonic() < deadline:
        if pid != "-":
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                sys.exit(f"process {pid} (port {port}) exited before it was ready")
        status, _, data = request(int(port), "GET", "/ready", timeout=2)
        if status == 200 and json.loads(data).get("ready") is True:
            return
        time.sleep(0.1)
    sys.exit(f"port {port}: GET /ready not 200 within {limit} s")

def v2_call(port, method, url_or_path, data=None, host=None):
    """A v2 request; an absolute URL of ours is sent to `port` with its path (and its host as Host)."""
    path, url_host = url_or_path, host
    m = re.match(r"https?://([^/]+)(/.*)", url_or_path)
    if m:
        url_host, path = m.group(1), m.group(2)
    return request(port, method, path, data, timeout=10, host=url_host)

def v2_wait(port, url, limit=60):
    deadline = time.monotonic() + limit
    while True:
        status, _, data = v2_call(port, "GET", url)
        if not isinstance(status, int):
            sys.exit(f"v2 status {url} on port {port}: {status}")
        v = json.loads(data)
        if v.get("status") in ("COMPLETED", "FAILED"):
            return v
        if time.monotonic() > deadline:
            sys.exit(f"v2 job {url} did not end within {limit} s: {v}")
        time.sleep(0.1)

def v2_submit(port, seed, host=None, prompt=None):
    data = json.loads(body(seed))
    if prompt:
        data["prompt"], data["num_inference_steps"], data["img_width"], data["img_height"] = prompt, 100, 512, 512
    status, _, answer = v2_call(port, "POST", "/v2/sdxl1.0-dreamshaper", json.dumps(data).encode(), host)
    if status != 200:
        sys.exit(f"v2 submit on port {port}: {status} {answer!r}")
    return json.loads(answer)

def v2(front, port_a, port_b, phase):
    """The replicas' shared v2 jobs (--job-store redis://…): one service whichever replica is asked."""
    front, port_a, port_b = int(front), int(port_a), int(port_b)
    problems = []
    seed = 4343
    status, headers, v1 = generate(port_a, seed, 30)
    if not is_image(status, headers, v1):
        sys.exit(f"v1 on replica A: {status}")
    if phase == "before":
        # Submitted to A, polled and fetched on B; submitted through nginx, polled on A and B.
        for submit_port, poll_port, what in ((port_a, port_b, "A -> B"), (front, port_a, "nginx -> A")):
            host = PUBLIC_HOST if submit_port == front else None
            job = v2_submit(submit_port, seed, host)
            done = v2_wait(poll_port, job["status_url"])
            if done["status"] != "COMPLETED":
                problems.append(f"v2 {what}: {done}")
                continue
            status, _, result = v2_call(poll_port, "GET", job["response_url"])
            output = json.loads(result)["output"]
            for port in (port_a, port_b):
                status, headers, image = v2_call(port, "GET", output)
                if not is_image(status, headers, image) or image != v1:
                    problems.append(f"v2 {what}: the output on port {port} is not v1's image ({status})")
            print(f"v2 {what}: completed, output identical to v1's on both replicas")
        # A long job submitted to A, cancelled on B while it runs on either.
        job = v2_submit(port_a, 7, None, prompt="a long one")
        deadline = time.monotonic() + 30
        while json.loads(v2_call(port_b, "GET", job["status_url"])[2])["status"] == "QUEUED":
            if time.monotonic() > deadline:
                sys.exit("v2: the long job was not taken within 30 s")
            time.sleep(0.05)
        status, _, answer = v2_call(port_b, "POST", job["status_url"].replace("/status", "/cancel"))
        done = v2_wait(port_a, job["status_url"])
        if status != 200 or done.get("error") != "cancelled":
            problems.append(f"v2 cancel on B: {status} {answer!r}, then {done}")
        else:
            print("v2 cancel: submitted on A, cancelled on B: FAILED, cancelled")
    else:
        # After the kill: through nginx, the survivor pulls the job and answers its polls.
        job = v2_submit(front, seed, PUBLIC_HOST)
        done = v2_wait(port_a, job["status_url"])
        status, headers, image = v2_call(port_a, "GET", json.loads(v2_call(port_a, "GET", job["response_url"])[2])["output"])
        if done["status"] != "COMPLETED" or image != v1:
            problems.append(f"v2 after the kill: {done}")
        else:
            print("v2 after the kill: submitted through nginx, run by the survivor, output identical to v1's")
    if problems:
        for p in problems:
            print("FAIL: " + p)
        sys.exit(1)

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")

def read_access_log(path):
    """{request id: the replica that answered}, and the POST lines that were passed on to another replica."""
    served_by, passed_on = {}, []
    pattern = re.compile(r'"POST [^"]*" (\d+) .* upstream="([^"]*)" ustatus="([^"]*)" .* rid=(\S+)')
    with open(path) as f:
        for line in f:
            m = pattern.search(line)
            if not m:
                continue
            upstreams = [u.strip() for u in m.group(2).split(",")]
            if len(upstreams) > 1:
                passed_on.append(f"{m.group(1)} after {m.group(2)} answered {m.group(3)}")
            if m.group(4) != "-":
                served_by[m.group(4)] = upstreams[-1]
    return served_by, passed_on

def load(front, port_a, port_b, victim_pid, signame, n, clients, kill_after, timeout, access_log, fail_timeout):
    front, port_a, port_b = int(front), int(port_a), int(port_b)
    n, clients, kill_after, timeout = int(n), int(clients), int(kill_after), float(timeout)
    fail_timeout = float(fail_timeout)
    victim, survivor = f"127.0.0.1:{port_b}", f"127.0.0.1:{port_a}"
    problems = []
    t0 = time.monotonic()

    # 1. The same seed on each replica directly, then through nginx: one image.
    seed = 4242
    direct = {}
    for name, port in (("replica A", port_a), ("replica B", port_b)):
        status, headers, data = generate(port, seed, timeout)
        if not is_image(status, headers, data):
            sys.exit(f"{name} directly: {status}, not a JPEG")
        direct[name] = hashlib.sha256(data).hexdigest()
    if direct["replica A"] != direct["replica B"]:
        problems.append(f"seed {seed}: replica A and replica B give different images")
    through = []
    for _ in range(4):
        status, headers, data = generate(front, seed, timeout, PUBLIC_HOST)
        if not is_image(status, headers, data):
            sys.exit(f"through nginx: {status}, not a JPEG")
        through.append(hashlib.sha256(data).hexdigest())
    if set(through) != {direct["replica A"]}:
        problems.append(f"seed {seed}: an image through nginx differs from the replicas' own")
    # nginx passes the client's Host on: a name the replicas were not given is refused by them (403), not by nginx.
    status, headers, data = generate(front, seed, timeout, "elsewhere.example.com")
    if status != 403 or "x-request-id" not in (headers or {}):
        problems.append(f"Host elsewhere.example.com through nginx: {status}, not the replica's 403")
    print(f"Host passed on: elsewhere.example.com through nginx is answered {status} by a replica")
    t_same = time.monotonic() - t0
    print(f"same seed: replica A, replica B and 4 requests through nginx (Host {PUBLIC_HOST}) give one image "
          f"({len(set(through) | set(direct.values()))} distinct; {t_same:.2f} s)")

    # 2. The load: `clients` threads take requests 0..n-1 in turn; the one that completes request `kill_after`
    #    kills replica B.
    results = [None] * n
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "kill_at": None}
    start = time.monotonic()

    def client():
        while True:
            with lock:
                i = state["next"]
                if i >= n:
                    return
                state["next"] += 1
            seed = 100 + i % 8
            t1 = time.monotonic()
            status, headers, data = generate(front, seed, timeout, PUBLIC_HOST)
            t2 = time.monotonic()
            if status == 200 and not is_image(status, headers, data):
                status = "200 but not a JPEG"
            results[i] = {"i": i, "seed": seed, "start": t1 - start, "end": t2 - start, "status": status,
                          "rid": headers.get("x-request-id") if headers else None,
                          "sha": hashlib.sha256(data).hexdigest() if status == 200 else None,
                          "json_error": bool(headers) and status != 200
                          and headers.get("content-type", "").startswith("application/json")}
            with lock:
                state["done"] += 1
                if state["done"] == kill_after and state["kill_at"] is None:
                    os.kill(int(victim_pid), getattr(signal, "SIG" + signame))
                    state["kill_at"] = time.monotonic() - start

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    kill_at = state["kill_at"]
    if kill_at is None:
        problems.append("replica B was never killed (fewer requests than FLEET_KILL_AFTER?)")
        kill_at = wall

    served_by, passed_on = read_access_log(access_log)

    # 3. The outcomes.
    def outcome(r):
        s = r["status"]
        if s == 200:
            return "200 image"
        if isinstance(s, int) and (s == 429 or 500 <= s <= 599):
            return f"{s} {'JSON' if r['json_error'] else 'not JSON'}"
        return f"VIOLATION: {s}"

    before = Counter(outcome(r) for r in results if r["start"] < kill_at)
    after = Counter(outcome(r) for r in results if r["start"] >= kill_at)
    total = before + after
    print()
    w = max([len(k) for k in total] + [12])
    print(f"{'outcome':<{w}}  {'started before kill':>19}  {'after kill':>10}  {'total':>5}")
    for key in sorted(total):
        print(f"{key:<{w}}  {before[key]:>19}  {after[key]:>10}  {total[key]:>5}")
    print(f"{'all':<{w}}  {sum(before.values()):>19}  {sum(after.values()):>10}  {sum(total.values()):>5}")
    for key in total:
        if key.startswith("VIOLATION"):
            problems.append(f"{total[key]} request(s) ended in {key[len('VIOLATION: '):]}, not an explicit 5xx/429")

    ok = [r for r in results if r["status"] == 200]
    by_replica = Counter(served_by.get(r["rid"], "unknown") for r in ok)
    if by_replica[survivor] == 0 or by_replica[victim] == 0:
        problems.append("the load did not reach both replicas")
    print()
    print(f"images served by: replica A {by_replica.pop(survivor, 0)}, replica B {by_replica.pop(victim, 0)}"
          + "".join(f", {k} {v}" for k, v in by_replica.items()))
    print(f"passed on by nginx to the other replica during the load: {len(passed_on)}")
    if any(served_by.get(r["rid"]) == victim and r["start"] > kill_at + 0.5 for r in ok):
        problems.append("replica B served a request started after it was killed")
    ok_after = [r for r in ok if r["start"] >= kill_at]
    if not ok_after:
        problems.append("no request started after the kill was served")
    if len({r["rid"] for r in ok}) != len(ok):
        problems.append("two answers carry the same x-request-id")

    # The same seed, whichever replica: one image per seed.
    images, replicas = defaultdict(set), defaultdict(set)
    for r in ok:
        images[r["seed"]].add(r["sha"])
        replicas[r["seed"]].add(served_by.get(r["rid"]))
    for s in sorted(images):
        if len(images[s]) != 1:
            problems.append(f"seed {s}: {len(images[s])} different images in the load")
    both = sum(1 for s in replicas if {survivor, victim} <= replicas[s])
    print(f"same seed in the load: {len(images)} seeds, one image each: "
          f"{all(len(v) == 1 for v in images.values())}; {both} of them served by both replicas")
    if both == 0:
        problems.append("no seed was served by both replicas: the cross-replica check proved nothing")

    # 4. The survivor keeps serving: 10 requests in a row, and /ready. They start once fail_timeout has passed
    #    since replica B's last failures (at the kill; nginx counts in whole seconds, hence 1.5 s more), so nginx
    #    tries replica B again, here or already during the load: its refused connection must have been passed on to
    #    replica A, unseen by the client.
    start_seq = start + kill_at + fail_timeout + 1.5
    time.sleep(max(0.0, start_seq - time.monotonic()))
    t3 = time.monotonic()
    seq = Counter()
    for k in range(10):
        status, headers, data = generate(front, 100 + k % 8, timeout, PUBLIC_HOST)
        seq["200 image" if is_image(status, headers, data) else str(status)] += 1
    t_seq = time.monotonic() - t3
    ready, _, _ = request(port_a, "GET", "/ready", timeout=5)
    gone, _, _ = request(port_b, "GET", "/ready", timeout=5)
    _, passed_on_after = read_access_log(access_log)
    passed_on_after = passed_on_after[len(passed_on):]
    print(f"after the load, {fail_timeout:g} s (fail_timeout) + 1.5 s after the kill: 10 sequential requests "
          f"through nginx: "
          f"{dict(seq)} ({t_seq:.2f} s); passed on to replica A: {len(passed_on_after)} "
          f"({'; '.join(passed_on_after) or 'none'})")
    print(f"GET /ready: replica A {ready}, replica B {gone}")
    if seq["200 image"] != 10:
        problems.append(f"the survivor did not serve all 10 sequential requests: {dict(seq)}")
    if not passed_on and not passed_on_after:
        problems.append("nginx did not try replica B again after fail_timeout (no request passed on)")
    if ready != 200:
        problems.append(f"replica A /ready answered {ready}")

    lat = [r["end"] - r["start"] for r in results]
    lat_ok = [r["end"] - r["start"] for r in ok]
    first_after = min((r["end"] for r in ok_after), default=float("nan"))
    print()
    print(f"timings: load {wall:.2f} s for {n} requests ({n / wall:.1f}/s, {clients} clients); kill (SIG{signame}) at "
          f"{kill_at:.2f} s; first image for a request started after it at {first_after:.2f} s")
    print(f"latency, all requests: p50 {pct(lat, 50):.3f} s, p95 {pct(lat, 95):.3f} s, max {max(lat):.3f} s; "
          f"images only: p50 {pct(lat_ok, 50):.3f} s, max {max(lat_ok, default=float('nan')):.3f} s; "
          f"client timeout {timeout:g} s")
    print()
    if problems:
        for p in problems:
            print("FAIL: " + p)
        sys.exit(1)
    print("fleet-test: ok: nothing hung, every failure an explicit 5xx/429, the survivor kept serving, "
          "one image per seed across replicas")

if __name__ == "__main__":
    {"ports": ports, "wait-ready": wait_ready, "load": load, "v2": v2}[sys.argv[1]](*sys.argv[2:])
PY

read -r port_a port_b port_front port_redis <<<"$(python3 "$work/fleet.py" ports 4)" || true
[ -n "${port_redis:-}" ] || die "could not pick free ports"

# Redis for the replicas' shared v2 jobs, when installed.
job_store=()
if [ "${FLEET_REDIS:-1}" != 0 ] && command -v redis-server >/dev/null; then
    mkdir -p "$work/redis"
    (cd "$work/redis" && exec redis-server --port "$port_redis" --bind 127.0.0.1 --save "" --appendonly no \
        >"$work/redis.log" 2>&1) &
    redis_pid=$!
    disown "$redis_pid" # no "Killed" notice from bash at the end
    for _ in $(seq 100); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port_redis), 1)" 2>/dev/null && break
        sleep 0.1
    done
    job_store=(--job-store "redis://127.0.0.1:$port_redis/0")
    say "redis-server on 127.0.0.1:$port_redis (pid $redis_pid): the replicas share their v2 jobs"
else
    say "redis-server is not installed (or FLEET_REDIS=0): the v2 fleet checks are skipped"
fi

# The replicas.
t=$SECONDS
for name in a b; do
    port=$port_a
    [ "$name" = b ] && port=$port_b
    "$bin" serve --model "$model" --addr "127.0.0.1:$port" --open-ranges --allowed-hosts images.example.com \
        "${job_store[@]}" >"$work/replica-$name.log" 2>&1 &
    replica_pids+=("$!")
    disown "$!" # no "Killed" notice from bash when replica B is killed
done
python3 "$work/fleet.py" wait-ready "$port_a" "${replica_pids[0]}" 60 || die "replica A did not become ready"
python3 "$work/fleet.py" wait-ready "$port_b" "${replica_pids[1]}" 60 || die "replica B did not become ready"
say "replica A 127.0.0.1:$port_a (pid ${replica_pids[0]}), replica B 127.0.0.1:$port_b (pid ${replica_pids[1]}):" \
    "ready in $((SECONDS - t)) s"

# nginx with the shipped conf: the replicas' ports, a loopback listen port and the access log in $work. Anything
# else in the shipped file that these substitutions expect and do not find fails the test, so the tested file is the
# shipped one.
sed -e "s/127\.0\.0\.1:7861/127.0.0.1:$port_a/" -e "s/127\.0\.0\.1:7862/127.0.0.1:$port_b/" \
    -e "s|^\( *\)listen 80;|\1listen 127.0.0.1:$port_front;|" \
    -e "s|/var/log/nginx/dreamshaper.access.log|$work/access.log|" "$conf_src" >"$work/dreamshaper.conf"
for line in "server 127.0.0.1:$port_a " "server 127.0.0.1:$port_b " "listen 127.0.0.1:$port_front;" \
    "$work/access.log" "server_name images.example.com;"; do
    grep -qF "$line" "$work/dreamshaper.conf" \
        || die "$conf_src no longer has a line this test relies on: $line"
done
fail_timeout=$(grep -o -m1 'fail_timeout=[0-9]*s' "$work/dreamshaper.conf" | tr -dc 0-9)
[ -n "$fail_timeout" ] || die "$conf_src: no fail_timeout=Ns on the upstream servers"
mkdir -p "$work/temp"
user_line=
[ "$(id -u)" -eq 0 ] && user_line="user $(id -un) $(id -gn);" # as root, nginx's workers would otherwise be nobody
cat >"$work/nginx.conf" <<EOF
# The main context Debian's /etc/nginx/nginx.conf provides, with every path in this test's directory.
$user_line
daemon off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log info;
events { worker_connections 256; }
http {
    client_body_temp_path $work/temp/client_body;
    proxy_temp_path $work/temp/proxy;
    fastcgi_temp_path $work/temp/fastcgi;
    uwsgi_temp_path $work/temp/uwsgi;
    scgi_temp_path $work/temp/scgi;
    access_log off;
    include $work/dreamshaper.conf;
}
EOF
"$nginx_bin" -e "$work/error.log" -p "$work" -c "$work/nginx.conf" -t -q || die "nginx -t refused the configuration"
t=$SECONDS
"$nginx_bin" -e "$work/error.log" -p "$work" -c "$work/nginx.conf" &
nginx_pid=$!
python3 "$work/fleet.py" wait-ready "$port_front" "$nginx_pid" 20 || die "nginx did not start"
say "$("$nginx_bin" -v 2>&1) on 127.0.0.1:$port_front (pid $nginx_pid), running $conf_src: up in $((SECONDS - t)) s"
if [ -n "$redis_pid" ]; then
    timeout 120 python3 "$work/fleet.py" v2 "$port_front" "$port_a" "$port_b" before || die "v2 fleet checks (see above)"
fi
say "load: $requests requests, $clients clients, replica B killed (SIG$kill_signal) after $kill_after answers"
echo

# In the background and waited for, so that Ctrl-C or SIGTERM stops the test at once (bash runs a trap only once the
# foreground command has finished).
status=0
timeout 170 python3 "$work/fleet.py" load "$port_front" "$port_a" "$port_b" "${replica_pids[1]}" "$kill_signal" \
    "$requests" "$clients" "$kill_after" "$client_timeout" "$work/access.log" "$fail_timeout" &
load_pid=$!
wait "$load_pid" || status=$?
load_pid=
echo
[ "$status" -eq 124 ] && die "the load did not finish within 170 s"
[ "$status" -eq 0 ] || die "see above"
kill -0 "$nginx_pid" 2>/dev/null || die "nginx exited during the test"
if [ -n "$redis_pid" ]; then
    timeout 120 python3 "$work/fleet.py" v2 "$port_front" "$port_a" "$port_b" after || die "v2 after the kill (see above)"
fi
if grep -E '\[(emerg|alert|crit)\]' "$work/error.log"; then
    die "nginx logged the errors above"
fi
say "passed in $((SECONDS - started)) s"
