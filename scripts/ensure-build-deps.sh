#!/usr/bin/env bash
# Installs the Debian packages that building clickagg needs, when they are missing: OpenSSL's
# headers and pkg-config, for the TLS of `run --sink postgres://…?sslmode=require` (the
# native-tls crate links the system's OpenSSL). Used by .ci/run; run it once before
# `cargo build` on a machine without them.
set -euo pipefail
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "OpenSSL's headers are missing and this user cannot install them: run 'apt-get install libssl-dev pkg-config' as root" >&2
    exit 1
fi
echo "installing Debian's libssl-dev and pkg-config (once)..." >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq >&2 || true
"${as_root[@]}" apt-get install -y -qq --no-install-recommends libssl-dev pkg-config >&2
