#!/usr/bin/env bash
# Runs pjdfstest (the POSIX file system test suite, Rust port 0.2.2) in a fresh subdirectory of
# DIR with scripts/pjdfstest.toml, prints passed/failed/skipped counts and the failed cases, and
# exits 1 if a case failed that FILE does not list as expected.
#
# Usage: scripts/pjdfstest.sh DIR [options] [-- PATTERN...]
#   --expect FILE        expected failures: one case name per line (e.g. utimensat::y2038),
#                        `#` starts a comment (say why); blank lines are ignored
#   --secondary-fs DIR2  a directory on another file system, for the EXDEV cases (default: a
#                        fresh directory in /dev/shm when that is another file system; `none`
#                        skips those cases)
#   --allow-remount      also run the 13 EROFS cases, in a second pass that remounts DIR's file
#                        system read-only and back (root only; DIR must not be on /)
#   --listing FILE       write every case with its result (and skip reason) to FILE
#   --log FILE           keep pjdfstest's full output in FILE (default: a file in /tmp that is
#                        removed unless a case failed unexpectedly)
#   --timeout SECONDS    give up on a pass that takes longer (default 900; a hung FUSE daemon)
#   --keep               keep the test directory
#   PATTERN...           run only the cases whose names contain a PATTERN
# pjdfstest is found on PATH, in ~/.cargo/bin, or as $PJDFSTEST (scripts/install-deps.sh
# installs it). Run as root: 130 cases need it (chown to other users, device nodes, ...).
# The last line printed is "pjdfstest: N passed, N failed, N skipped"; failed counts only
# unexpected failures. Exit: 0 ok, 1 unexpected failure, 2 usage or setup error.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
config=$here/pjdfstest.toml

say() { echo "pjdfstest: $*"; }
die() {
    echo "pjdfstest: error: $*" >&2
    exit 2
}
usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }

dir='' expect='' secondary='' allow_remount=0 listing='' log='' timeout_s=900 keep=0
patterns=()
while (($#)); do
    case "$1" in
    --expect) expect=${2:?--expect needs a file}; shift ;;
    --secondary-fs) secondary=${2:?--secondary-fs needs a directory}; shift ;;
    --allow-remount) allow_remount=1 ;;
    --listing) listing=${2:?--listing needs a file}; shift ;;
    --log) log=${2:?--log needs a file}; shift ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift ;;
    --keep) keep=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; patterns=("$@"); break ;;
    -*) die "unknown option $1 (try --help)" ;;
    *)
        [[ -z $dir ]] || die "one DIR only (got $dir and $1)"
        dir=$1
        ;;
    esac
    shift
done
[[ -n $dir ]] || { usage >&2; exit 2; }
[[ -d $dir ]] || die "$dir is not a directory"
[[ -z $expect || -r $expect ]] || die "cannot read $expect"
[[ $timeout_s =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds"

pjd=${PJDFSTEST:-}
if [[ -z $pjd ]]; then
    if command -v pjdfstest >/dev/null; then
        pjd=$(command -v pjdfstest)
    elif [[ -x $HOME/.cargo/bin/pjdfstest ]]; then
        pjd=$HOME/.cargo/bin/pjdfstest
    else
        die "pjdfstest is not installed: run scripts/install-deps.sh (or cargo install --locked pjdfstest --version 0.2.2)"
    fi
fi
version=$("$pjd" --version 2>/dev/null | awk '{print $2}') || die "$pjd does not run"
[[ $version == 0.2.2 ]] || say "warning: pjdfstest $version, the config and baseline are for 0.2.2"
[[ $(id -u) -eq 0 ]] || say "warning: not root: the cases that need root are skipped"

# --- the test directory, the secondary file system, the logs -------------------------------------
dir=$(cd "$dir" && pwd)
workdir=$(mktemp -d "$dir/pjdfstest.XXXXXX") || die "cannot create a directory in $dir"
chmod 755 "$workdir"
made_secondary=
if [[ -z $secondary ]]; then
    if [[ -d /dev/shm && $(stat -c %d /dev/shm) != $(stat -c %d "$workdir") ]]; then
        made_secondary=$(mktemp -d /dev/shm/pjdfstest-secondary.XXXXXX)
        secondary=$made_secondary
    else
        say "no /dev/shm on another file system: the EXDEV cases are skipped (see --secondary-fs)"
        secondary=none
    fi
fi
[[ $secondary == none || -d $secondary ]] || die "--secondary-fs $secondary is not a directory"
secondary_args=()
[[ $secondary == none ]] || secondary_args=(--secondary-fs "$secondary")

tmp=$(mktemp -d)
user_log=1
if [[ -z $log ]]; then
    log=$(mktemp "${TMPDIR:-/tmp}/pjdfstest.XXXXXX.log")
    user_log=0
fi
: >"$log"
failed=0
cleanup() {
    if ((keep)); then say "kept $workdir"; else rm -rf "$workdir"; fi
    [[ -z $made_secondary ]] || rm -rf "$made_secondary"
    rm -rf "$tmp"
    # The full output is kept when asked for, or when something failed unexpectedly.
    ((user_log || failed)) || rm -f "$log"
}
trap cleanup EXIT

fstype=$(findmnt -n -o FSTYPE -T "$workdir" 2>/dev/null || stat -f -c %T "$workdir")
say "pjdfstest $version on $workdir ($fstype), config $config, secondary fs $secondary"

# run_pass CONFIG RESULTS [PATTERN...]: one pjdfstest run; appends "STATUS<TAB>NAME<TAB>REASON"
# lines to RESULTS. Returns 2 when pjdfstest did not get to its summary (crash, hang).
run_pass() {
    local cfg=$1 results=$2
    shift 2
    local out=$tmp/pass.out rc=0
    # RUST_BACKTRACE=0: a failed case prints its panic message, not a backtrace.
    RUST_BACKTRACE=0 NO_COLOR=1 timeout --kill-after=10 "$timeout_s" \
        "$pjd" -c "$cfg" -p "$workdir" "${secondary_args[@]}" "$@" >"$out" 2>&1 || rc=$?
    cat "$out" >>"$log"
    if ((rc == 124 || rc == 137)); then
        say "pjdfstest timed out after ${timeout_s}s; the last lines were:"
        tail -n 5 "$out" | sed 's/^/    /'
        return 2
    fi
    if ! grep -q '^Summary: ' "$out"; then
        say "pjdfstest stopped (exit $rc) without its summary; the last lines were:"
        tail -n 10 "$out" | sed 's/^/    /'
        return 2
    fi
    # A case line is "name<spaces>status"; the tab-indented lines after it say why it was
    # skipped or how it failed (the first one is kept as the reason).
    awk -v OFS='\t' '
        function flush() { if (name != "") print status, name, reason; name = "" }
        match($0, /^[A-Za-z0-9_:]+ +(ok|skipped|FAILED|failed as expected|PASSED UNEXPECTEDLY)$/) {
            flush()
            name = $1
            status = $0; sub(/^[A-Za-z0-9_:]+ +/, "", status)
            if (status == "FAILED" || status == "failed as expected") status = "fail"
            else if (status == "PASSED UNEXPECTEDLY") status = "ok"
            reason = ""
            next
        }
        /^Summary: / { flush(); next }
        name != "" && reason == "" && /^\t/ { reason = $0; sub(/^\t+/, "", reason); gsub(/\t/, " ", reason) }
    ' "$out" >>"$results"
}

results=$tmp/results
: >"$results"
start=$(date +%s.%N)
run_pass "$config" "$results" "${patterns[@]}" || { failed=1; say "full output: $log"; exit 2; }
if ((allow_remount)); then
    # The EROFS cases alone, with remounts allowed; their results replace the first pass's skips.
    rcfg=$tmp/remount.toml
    sed 's/^allow_remount = false/allow_remount = true/' "$config" >"$rcfg"
    grep -q '^allow_remount = true' "$rcfg" || die "cannot turn allow_remount on in $config"
    say "second pass: the EROFS cases, remounting $(stat -c %m "$workdir" 2>/dev/null || echo DIR) read-only"
    erofs=$tmp/erofs
    : >"$erofs"
    run_pass "$rcfg" "$erofs" erofs || { failed=1; say "full output: $log"; exit 2; }
    awk -F'\t' 'NR == FNR { again[$2] = 1; print; next } !($2 in again)' \
        "$erofs" "$results" >"$tmp/merged"
    mv "$tmp/merged" "$results"
fi
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

# --- expected failures ------------------------------------------------------------------------
declare -A expected=()
if [[ -n $expect ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%%#*}
        line=$(echo "$line" | tr -d '[:space:]')
        [[ -z $line ]] || expected[$line]=1
    done <"$expect"
fi
declare -A seen=()
passed=0 failed=0 skipped=0 xfail=0
failed_list=() xfail_list=() xpass_list=() skipped_list=()
while IFS=$'\t' read -r status name reason; do
    seen[$name]=1
    case "$status" in
    ok)
        passed=$((passed + 1))
        [[ -z ${expected[$name]:-} ]] || xpass_list+=("$name")
        ;;
    skipped)
        skipped=$((skipped + 1))
        skipped_list+=("$name${reason:+  ($reason)}")
        ;;
    fail)
        if [[ -n ${expected[$name]:-} ]]; then
            xfail=$((xfail + 1))
            xfail_list+=("$name")
        else
            failed=$((failed + 1))
            failed_list+=("$name${reason:+  -- $reason}")
        fi
        ;;
    esac
done <"$results"
total=$((passed + failed + xfail + skipped))

if [[ -n $listing ]]; then
    {
        echo "# pjdfstest $version, $(date -u +%Y-%m-%d), Linux $(uname -r), $fstype"
        echo "# $total cases: $passed passed, $((failed + xfail)) failed, $skipped skipped"
        echo "# status<TAB>case<TAB>reason (for skips and failures)"
        # failures first, then skips, then passes; a pass has no reason column
        awk -F'\t' -v OFS='\t' '{ r = ($1 == "fail") ? 0 : ($1 == "skipped") ? 1 : 2
            print r, ($3 == "" ? $1 OFS $2 : $0) }' "$results" | sort -t$'\t' -k1,1n -k3,3 | cut -f2-
    } >"$listing"
    say "listing written to $listing"
fi

if ((${#skipped_list[@]})); then
    say "$skipped skipped:"
    printf '    %s\n' "${skipped_list[@]}"
fi
if ((${#xfail_list[@]})); then
    say "$xfail failed as expected (listed in $expect):"
    printf '    %s\n' "${xfail_list[@]}"
fi
if ((${#xpass_list[@]})); then
    say "${#xpass_list[@]} listed in $expect passed (remove them from the list?):"
    printf '    %s\n' "${xpass_list[@]}"
fi
for name in "${!expected[@]}"; do
    ((${#patterns[@]})) || [[ -n ${seen[$name]:-} ]] || say "warning: $expect names $name, which is no case"
done
if ((failed)); then
    say "$failed FAILED:"
    printf '    %s\n' "${failed_list[@]}"
    say "pjdfstest's full output: $log"
fi
say "$total cases in ${elapsed}s"
echo "pjdfstest: $passed passed, $failed failed, $skipped skipped"
((failed == 0)) || exit 1
