#!/usr/bin/env bash
# The project's test command: format and lint checks (fail fast), a build of every target,
# then the whole test suite with cargo-nextest against a real S3 server (moto) started here on
# a free loopback port and stopped on exit, and the mount tests a second time through
# /dev/fuse instead of io_uring. Exits non-zero if any run failed.
#
# Usage: scripts/test.sh [extra arguments for cargo nextest run]
# Needs: cargo with rustfmt and clippy, cargo-nextest, curl, and moto's server
# (scripts/install-deps.sh installs all of them).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

step() { echo "[$(date -u +%H:%M:%S)] test.sh: $*"; }
die() {
    echo "test.sh: error: $*" >&2
    exit 1
}

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo build --workspace --all-targets"
cargo build --workspace --all-targets --quiet

# --- the S3 server ---------------------------------------------------------------------------
if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
if command -v moto_server >/dev/null && moto_server --help >/dev/null 2>&1; then
    moto=(moto_server)
elif python3 -c 'import moto.server' >/dev/null 2>&1; then
    moto=(python3 -m moto.server)
else
    die "moto's S3 server is missing: run scripts/install-deps.sh (or pip install 'moto[server]')"
fi

# shellcheck source=scripts/lib-moto.sh
source "$root/scripts/lib-moto.sh"
moto_log="$root/target/moto-server.log"
trap stop_moto EXIT
trap 'stop_moto; exit 130' INT
trap 'stop_moto; exit 143' TERM

mkdir -p "$root/target"
start_moto "$moto_log" "${moto[@]}" || true
[[ -n $endpoint ]] || die "could not start moto's S3 server (${moto[*]}); see $moto_log"
step "moto S3 server at $endpoint (pid $moto_pid, log $moto_log)"
export OWFS_TEST_S3_ENDPOINT="$endpoint"
# Tests that count requests read the server's log.
export OWFS_TEST_MOTO_LOG="$moto_log"

# --- the tests -------------------------------------------------------------------------------
# Mounts serve FUSE requests through io_uring where the kernel has it (the default, which as
# root turns on the fuse module's enable_uring): the whole suite runs that way, then the mount
# tests again with every request through /dev/fuse (older kernels, -o uring=off).
step "cargo nextest run --workspace --no-fail-fast $*"
status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?
step "nextest exited with status $status"
# (Not the store-cost tests of pages.rs: what they measure does not depend on the transport.)
# Left out: racing_publishers_exactly_one_wins, which makes no mount (nothing of it goes
# through FUSE) and fails now and then against moto, whose conditional create is not atomic
# under two concurrent PUTs (a test-server limit, seen in 2 CI runs); the first pass has it.
filter='not binary(pages) and not test(racing_publishers_exactly_one_wins)'
step "OWFS_TEST_URING=off cargo nextest run -p owfs-tests --no-fail-fast -E '$filter' $*"
OWFS_TEST_URING=off cargo nextest run -p owfs-tests --no-fail-fast -E "$filter" "$@" || status=$?
step "nextest (/dev/fuse) done; status $status"
exit "$status"
