#!/usr/bin/env bash
# Installs the Debian packages that building clickagg needs, when they are missing: OpenSSL's
# headers and pkg-config, for the TLS of `run --sink postgres://…?sslmode=require` (the
# native-tls crate links the system's OpenSSL). Used by .ci/run; run it once before
# `cargo build` on a machine without them.
set -euo pipefail
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl; then
    exit 0
fi
bash "$(dirname "$0")/apt-install.sh" "OpenSSL's headers (for PostgreSQL TLS)" libssl-dev pkg-config
