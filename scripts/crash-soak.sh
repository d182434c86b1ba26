#!/usr/bin/env bash
# Crash soak: runs the crash test (tests/tests/crash.rs) for many random kill points and
# reports how many trials held. Each trial mounts a workspace, runs SQLite transactions and
# file writes through it, SIGKILLs the daemon at a random moment, mounts the workspace again
# on an empty cache and checks: integrity_check, rows a prefix, every synced row present,
# files and rows from one cut, and the content of every file (three more writers replace
# files/wK by rename after each transaction, without fsync: never a byte nobody wrote).
#
# Usage: scripts/crash-soak.sh [TRIALS] [STORES]
#   TRIALS  trials per store and journal mode (WAL and rollback), default 250 (1,000 in all)
#   STORES  comma-separated: file, s3 (s3 needs OWFS_TEST_S3_ENDPOINT or starts moto), default file
# Output: one line per trial, then "crash trials: H of N held"; exit 0 only if all held.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
case "${1:-}" in -h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
trials=${1:-250}
stores=${2:-file}
cargo build --workspace --all-targets --quiet
export OWFS_CRASH_TRIALS=$trials OWFS_CRASH_STORES=$stores
log=$(mktemp /tmp/owfs-crash-soak.XXXXXX.log)
set +e
cargo nextest run -p owfs-tests --test crash --no-capture 2>&1 | tee "$log" |
    grep --line-buffered -E '^\[|crash trials|FAIL|panicked'
rc=${PIPESTATUS[0]}
set -e
if ! grep -q 'crash trials:' "$log"; then
    # nextest or the build failed before any trial: show why instead of nothing.
    echo "crash-soak: no trial ran (exit $rc); the end of $log:" >&2
    tail -n 30 "$log" >&2
fi
exit "$rc"
