#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests of `run --sink postgres://`.
#
#   scripts/test-postgres.sh start DIR PORT   initialises a cluster in DIR/pg, starts it on
#                                             127.0.0.1:PORT (trust auth, no Unix socket) and
#                                             prints the URL of a fresh database `clickagg`
#   scripts/test-postgres.sh start DIR PORT tls
#                                             the same, but the server takes TLS connections only:
#                                             a self-signed certificate for localhost and
#                                             127.0.0.1, made by openssl, is DIR/tls/server.crt
#   scripts/test-postgres.sh stop DIR         stops it (immediate mode: the tests are done with it)
#
# Debian's postgresql package is installed when missing. PostgreSQL refuses to run as root, so a
# root caller runs the server as the package's `postgres` user.
set -euo pipefail
command_name=${1:-}
dir=${2:-}
if [ -z "$command_name" ] || [ -z "$dir" ]; then
    echo "usage: $0 start DIR PORT [tls] | stop DIR" >&2
    exit 2
fi

find_bin() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$found" ] && [ -x "$found/initdb" ]; then
        echo "$found"
    fi
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        echo "postgresql is missing and this user cannot install it: run 'apt-get install postgresql' as root" >&2
        exit 1
    fi
}

bin=$(find_bin)
if [ -z "$bin" ]; then
    echo "installing Debian's postgresql (once)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq >&2 || true
    as_root apt-get install -y -qq --no-install-recommends postgresql >&2
    bin=$(find_bin)
    if [ -z "$bin" ]; then
        echo "postgresql was installed but no initdb was found under /usr/lib/postgresql" >&2
        exit 1
    fi
fi

if [ "${4:-}" = tls ] && ! command -v openssl >/dev/null 2>&1; then
    echo "installing Debian's openssl (once)..." >&2
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -qq >&2 || true
    as_root apt-get install -y -qq --no-install-recommends openssl >&2
fi

# Runs a server program as a user PostgreSQL accepts.
as_server() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

data="$dir/pg"
case "$command_name" in
    start)
        port=${3:?usage: $0 start DIR PORT}
        mkdir -p "$data"
        if [ "$(id -u)" -eq 0 ]; then
            # The test's temporary directory is private to root; the server's user must reach it.
            chmod 0755 "$dir"
            chown postgres "$data"
        fi
        as_server "$bin/initdb" -D "$data" -A trust -U clickagg --no-sync -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 || {
            cat "$dir/initdb.log" >&2
            exit 1
        }
        options="-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=''"
        if [ "${4:-}" = tls ]; then
            # A self-signed certificate, the server's own root; plain connections are refused.
            tls="$dir/tls"
            mkdir -p "$tls"
            openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=localhost" \
                -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
                -keyout "$tls/server.key" -out "$tls/server.crt" >"$tls/openssl.log" 2>&1 || {
                cat "$tls/openssl.log" >&2
                exit 1
            }
            chmod 0600 "$tls/server.key"
            if [ "$(id -u)" -eq 0 ]; then
                chmod 0755 "$tls"
                chown postgres "$tls/server.key" "$tls/server.crt"
            fi
            printf 'hostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n' >"$data/pg_hba.conf"
            options="$options -c ssl=on -c ssl_cert_file=$tls/server.crt -c ssl_key_file=$tls/server.key"
        fi
        # fsync off: the tests check what clickagg commits, not the disk under PostgreSQL.
        as_server "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
            -o "$options -c fsync=off -c full_page_writes=off" \
            start >&2 || {
            cat "$data/server.log" >&2 || true
            exit 1
        }
        # libpq's default (sslmode=prefer) takes TLS when the server offers it.
        "$bin/createdb" -h 127.0.0.1 -p "$port" -U clickagg clickagg >&2
        echo "postgres://clickagg@127.0.0.1:$port/clickagg"
        ;;
    stop)
        if [ -f "$data/postmaster.pid" ]; then
            as_server "$bin/pg_ctl" -D "$data" -m immediate -w stop >&2 || true
        fi
        ;;
    *)
        echo "usage: $0 start DIR PORT [tls] | stop DIR" >&2
        exit 2
        ;;
esac
