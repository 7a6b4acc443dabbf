#!/usr/bin/env bash
# apt-install.sh WHAT PACKAGE...: installs Debian PACKAGEs for WHAT (a few words, for messages),
# as root directly or through passwordless sudo; fails with the command to run otherwise.
# Shared by ensure-build-deps.sh and ensure-chromium.sh.
set -euo pipefail
what=$1
shift
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "$what: missing, and this user cannot install it: run 'apt-get install $*' as root" >&2
    exit 1
fi
echo "installing Debian's $* for $what (once)..." >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq >&2 || true
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "$@" >&2
