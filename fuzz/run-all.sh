#!/usr/bin/env bash
# Fuzzes every target in turn for SECONDS each (default 600), on the stable toolchain.
#   fuzz/run-all.sh [SECONDS]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). New inputs go to fuzz/work/<target> (not
# committed); crashes to fuzz/artifacts/<target>: add a crash's input to fuzz/corpus/<target>
# once fixed, so that tests/fuzz_corpus.rs keeps it fixed.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-600}"
# cargo-fuzz's instrumentation flags are nightly-only; this lets the stable compiler accept them.
export RUSTC_BOOTSTRAP=1
for target in log_file header durations query cluster_config; do
    mkdir -p "work/$target"
    echo "== $target: ${seconds}s"
    cargo fuzz run --sanitizer none "$target" "work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 2>&1 | grep -E "^(Done|stat::|==|SUMMARY|.*ERROR)" || true
    if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
        echo "$target: crashes in fuzz/artifacts/$target" >&2
        exit 1
    fi
done
