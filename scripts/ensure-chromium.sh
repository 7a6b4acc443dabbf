#!/usr/bin/env bash
# Installs Debian's Chromium for the dashboard's browser test, when it is missing.
# Prints the browser's path. Used by tests/dashboard.rs and .ci/run.
set -euo pipefail
for candidate in chromium chromium-browser; do
    if command -v "$candidate" >/dev/null 2>&1; then
        command -v "$candidate"
        exit 0
    fi
done
bash "$(dirname "$0")/apt-install.sh" "the dashboard's browser test" chromium
command -v chromium
