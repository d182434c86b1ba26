# shellcheck shell=bash
# Shared by scripts/install-deps.sh and scripts/install-bench-deps.sh (sourced, not run).
# The caller defines say MESSAGE and die MESSAGE.

# apt_ensure PACKAGE...: apt-get installs the packages that are not installed (as root or
# through sudo). A package whose name is also a working command (git) counts as present.
apt_ensure() {
    local p missing=() sudo=() log
    if ! command -v dpkg-query >/dev/null; then
        say "not a Debian-like system (no dpkg-query): install $* yourself"
        return
    fi
    for p in "$@"; do
        if [[ $p == git ]] && command -v git >/dev/null; then continue; fi
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "Debian packages present"
        return
    fi
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null ||
            die "missing packages ${missing[*]}, and neither root nor sudo is available to install them"
        sudo=(sudo)
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
}

# Under pyenv a freshly installed console script needs its shim first.
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
