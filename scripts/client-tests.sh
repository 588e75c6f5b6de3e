#!/usr/bin/env bash
# The server driven by the real clients of the APIs it speaks: the hosted service's SDK (`segmind`), A1111's
# (`webuiapi`) and OpenAI's (`openai`), from PyPI into a venv of their own (target/client-venv). Starts one server
# with the tiny model on a free loopback port, then runs every scripts/clients/test_*.py against it; each script uses
# only its client's public API and compares the images with the v1 endpoint's for the same request. Fails if any
# test fails, or if there is no test to run.
#
#   scripts/client-tests.sh                 # build (a no-op when up to date), install the clients (once), run all
#   scripts/client-tests.sh openai          # only scripts/clients/test_openai.py
#   scripts/client-tests.sh openai segmind  # those two
#
# CLIENT_VENV (default target/client-venv) and DREAMSHAPER_BIN (default $CARGO_TARGET_DIR/release/dreamshaper,
# built here) override the paths.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${CLIENT_VENV:-target/client-venv}
key=client-test-key

if [ -n "${DREAMSHAPER_BIN:-}" ]; then
    binary=$DREAMSHAPER_BIN
else
    # Always built: a stale binary from an earlier build must not be the one tested.
    cargo build --release --quiet
    binary=${CARGO_TARGET_DIR:-target}/release/dreamshaper
fi

tests=()
if [ $# -eq 0 ]; then
    tests=(scripts/clients/test_*.py)
    [ -e "${tests[0]}" ] || { echo "no scripts/clients/test_*.py to run" >&2; exit 1; }
else
    for name in "$@"; do
        [ -e "scripts/clients/test_$name.py" ] || { echo "no scripts/clients/test_$name.py" >&2; exit 1; }
        tests+=("scripts/clients/test_$name.py")
    done
fi

stamp="$venv/.requirements"
if ! cmp -s scripts/clients/requirements.txt "$stamp" 2>/dev/null; then
    echo "installing the clients into $venv"
    start=$SECONDS
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/clients/requirements.txt
    cp scripts/clients/requirements.txt "$stamp"
    echo "installed ($((SECONDS - start)) s)"
fi

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DREAMSHAPER_API_KEY=$key "$binary" serve --model models/tiny-sdxl --addr "127.0.0.1:$port" --open-ranges \
    >"$work/server.log" 2>&1 &
server_pid=$!
ready=
for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then
        ready=1
        break
    fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
        echo "the server exited:" >&2
        cat "$work/server.log" >&2
        exit 1
    fi
    sleep 0.2
done
if [ -z "$ready" ]; then
    echo "the server was not ready within 60 s:" >&2
    cat "$work/server.log" >&2
    exit 1
fi

failed=0
for test in "${tests[@]}"; do
    echo "==> $test"
    start=$SECONDS
    if SERVER_URL="http://127.0.0.1:$port" API_KEY=$key "$venv/bin/python" "$test"; then
        echo "==> $test: ok ($((SECONDS - start)) s)"
    else
        echo "==> $test: FAILED" >&2
        failed=1
    fi
done
if [ "$failed" != 0 ]; then
    echo "server log (last 50 lines):" >&2
    tail -50 "$work/server.log" >&2
fi
exit "$failed"
