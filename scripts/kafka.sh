#!/usr/bin/env bash
# A throwaway Kafka broker on loopback for the tests, demos and benchmarks of `run --kafka`:
# nisshi (crates.io, Apache-2.0), a broker that speaks the Kafka protocol, with its in-memory
# storage engine. No JVM, no Docker.
#
#   scripts/kafka.sh install           builds and installs nisshi when it is missing
#   scripts/kafka.sh start DIR PORT    starts a broker on 127.0.0.1:PORT (its log and pid in
#                                      DIR) and prints its bootstrap address
#   scripts/kafka.sh stop DIR          stops it
#
# nisshi 0.8.1 needs rustc 1.96 or later, so it is built with the machine's nightly toolchain:
#   cargo +nightly install nisshi --version 0.8.1 --locked --no-default-features --features dynostore
# (about 14 minutes on 2 cores, once). Installs are serialized by a lock, so tests that start
# brokers at the same time build it once.
set -euo pipefail
NISSHI_VERSION=0.8.1
command_name=${1:-}

nisshi_bin() {
    local candidate
    for candidate in "${CARGO_HOME:-$HOME/.cargo}/bin/nisshi" "$(command -v nisshi 2>/dev/null || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] && "$candidate" --version 2>/dev/null | grep -q " $NISSHI_VERSION"; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install() {
    if nisshi_bin >/dev/null; then
        return 0
    fi
    local lock="${TMPDIR:-/tmp}/clickagg-nisshi-install.lock"
    exec 9>"$lock"
    flock 9
    if nisshi_bin >/dev/null; then
        return 0
    fi
    if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
        echo "nisshi $NISSHI_VERSION needs rustc >= 1.96: install a nightly toolchain (rustup toolchain install nightly)" >&2
        exit 1
    fi
    echo "building the Kafka test broker nisshi $NISSHI_VERSION with the nightly toolchain (once; about 14 minutes on 2 cores)..." >&2
    cargo +nightly install nisshi --version "$NISSHI_VERSION" --locked --no-default-features --features dynostore --force >&2
    nisshi_bin >/dev/null || {
        echo "nisshi was built but '$("${CARGO_HOME:-$HOME/.cargo}/bin/nisshi" --version 2>&1)' is not version $NISSHI_VERSION" >&2
        exit 1
    }
}

case "$command_name" in
    install)
        install
        ;;
    start)
        dir=${2:?usage: $0 start DIR PORT}
        port=${3:?usage: $0 start DIR PORT}
        install
        bin=$(nisshi_bin)
        mkdir -p "$dir"
        if [ -f "$dir/nisshi.pid" ] && kill -0 "$(cat "$dir/nisshi.pid")" 2>/dev/null; then
            echo "a broker is already running from $dir (pid $(cat "$dir/nisshi.pid"))" >&2
            exit 1
        fi
        # setsid: the broker outlives this script, in a session of its own, until `stop`.
        setsid "$bin" broker \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            --storage-engine memory://nisshi/ \
            --group-initial-rebalance-delay 0s \
            >"$dir/nisshi.log" 2>&1 </dev/null &
        echo $! >"$dir/nisshi.pid"
        for _ in $(seq 1 300); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                echo "127.0.0.1:$port"
                exit 0
            fi
            if ! kill -0 "$(cat "$dir/nisshi.pid")" 2>/dev/null; then
                echo "the broker exited at its start:" >&2
                cat "$dir/nisshi.log" >&2
                exit 1
            fi
            sleep 0.1
        done
        echo "the broker did not listen on 127.0.0.1:$port within 30 s:" >&2
        cat "$dir/nisshi.log" >&2
        exit 1
        ;;
    stop)
        dir=${2:?usage: $0 stop DIR}
        if [ -f "$dir/nisshi.pid" ]; then
            pid=$(cat "$dir/nisshi.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$dir/nisshi.pid"
        fi
        ;;
    *)
        echo "usage: $0 install | start DIR PORT | stop DIR" >&2
        exit 2
        ;;
esac
