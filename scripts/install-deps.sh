#!/usr/bin/env bash
# Installs what building, demonstrating and testing owfs needs, and only what is missing:
#   - Debian packages: fuse3 sqlite3 curl attr restic time libacl1-dev (apt-get, as root or
#     through sudo);
#   - the Rust toolchain's rustfmt and clippy components, cargo-nextest, and pjdfstest 0.2.2
#     (the POSIX file system test suite scripts/pjdfstest.sh runs; it links libacl);
#   - moto's S3 server (PyPI `moto[server]`), the S3 the tests run against, and stress-ng
#     (Debian), whose file system stressors the tests run on a mount.
# Used by scripts/demo.sh and .ci/run. Safe to run again: it changes nothing that is present.
#
# Usage: scripts/install-deps.sh [--no-test-tools]
#   --no-test-tools   skip cargo-nextest, pjdfstest, rustfmt/clippy and moto (what
#                     scripts/demo.sh needs)
set -euo pipefail

test_tools=1
for arg in "$@"; do
    case "$arg" in
    --no-test-tools) test_tools=0 ;;
    -h | --help)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "install-deps: unknown argument $arg (try --help)" >&2
        exit 2
        ;;
    esac
done

say() { echo "install-deps: $*"; }
die() {
    echo "install-deps: error: $*" >&2
    exit 1
}
# shellcheck source=scripts/lib-install.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib-install.sh"

# --- Debian packages -------------------------------------------------------------------------
APT_PACKAGES=(fuse3 sqlite3 curl attr restic time libacl1-dev)
apt_ensure "${APT_PACKAGES[@]}"
if [[ $test_tools -eq 1 ]]; then
    apt_ensure stress-ng
fi

# --- Rust ------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
    say "no Rust toolchain: installing one with rustup (https://rustup.rs)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
        sh -s -- -y -q --profile minimal --component rustfmt,clippy ||
        die "could not install Rust; install it from https://rustup.rs and run this again"
    export PATH="$HOME/.cargo/bin:$PATH"
    say "Rust installed in ~/.cargo/bin; add it to your PATH (e.g. source ~/.cargo/env)"
fi

if ((test_tools)); then
    for comp in rustfmt clippy; do
        sub=${comp/rustfmt/fmt}
        if ! cargo "$sub" --version >/dev/null 2>&1; then
            command -v rustup >/dev/null || die "cargo $sub is missing and there is no rustup to add it"
            say "rustup component add $comp"
            rustup component add "$comp" >/dev/null
        fi
    done
    if ! cargo nextest --version >/dev/null 2>&1; then
        say "cargo install cargo-nextest (a few minutes)"
        cargo install --locked --quiet cargo-nextest
    fi
    # pjdfstest: the version scripts/pjdfstest.toml and docs/pjdfstest-native.txt are for.
    pjdfstest_version=0.2.2
    pjdfstest_bin=$(command -v pjdfstest || echo "$HOME/.cargo/bin/pjdfstest")
    if [[ $("$pjdfstest_bin" --version 2>/dev/null) != "pjdfstest $pjdfstest_version" ]]; then
        say "cargo install pjdfstest $pjdfstest_version (about a minute)"
        cargo install --locked --quiet pjdfstest --version "$pjdfstest_version"
    fi
fi

# --- moto (S3 server for the tests) ----------------------------------------------------------
moto_works() {
    rehash
    if command -v moto_server >/dev/null && moto_server --help >/dev/null 2>&1; then
        return 0
    fi
    python3 -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1
}

if ((test_tools)); then
    if moto_works; then
        say "moto server present"
    else
        pip_install 'moto[server]'
        moto_works || die "moto installed, but neither moto_server nor python3 -m moto.server runs"
    fi
fi

say "done"
