#!/usr/bin/env bash
# Handoff, crash recovery and idle cost of `owfs mount`, on a file:// store and on S3
# (moto_server on a free loopback port; AWS_ACCESS_KEY_ID/SECRET = testing, us-east-1).
# scripts/bench_handoff.py does the measuring; its --help (python3 scripts/bench_handoff.py
# --help) describes every step. In short, per store:
#
#   handoff   a workspace of 64 x 16 MiB random files (1 GiB) on node A, which runs a light
#             workload (a line appended to a file every 10 ms). Pause = from the start of
#             `owfs handoff A` until node B (`owfs mount --wait`, another cache dir and mount
#             point) has served a first 4 KiB read and a first 4 KiB write + fsync. Variants:
#             (a) B pre-pulled (`owfs mount --prefetch-only`) while A ran; (b) B's cache empty.
#             Each variant is a chain (B becomes the next run's A) on a fresh store.
#             P50/P95/max over --runs runs each; also the time until B has read the whole
#             workspace (cat > /dev/null). Every handoff is checked to lose no appended line.
#   crash     SIGKILL of A's daemon, `umount -l`, then B mounts with --takeover; and with
#             --wait after a short lease (-o lease_ttl_ms=5000,lease_renew_ms=1000,
#             lease_margin_ms=1000): time to B's first read and first write + fsync.
#   idle      a mount with default options left alone for --idle-seconds (in the background
#             while the rest runs, on its own workspace): store requests per hour, from the
#             daemon's counters and, on S3, from moto's request log.
#   commits   20 x (one 4 KiB file + `owfs sync`): PUT/GET/LIST per commit.
#
# Usage: scripts/bench-handoff.sh [options]
#   --runs N            handoff runs per variant (default 20; --quick: 5)
#   --crash-runs N      crash runs per variant (default 5; --quick: 2)
#   --idle-seconds S    idle measurement (default 120; --quick: 30)
#   --files N           16 MiB files in the workspace (default 64 = 1 GiB; --quick: 16)
#   --quick             256 MiB, 5 + 2 runs, 30 s idle: a smoke run of a few minutes
#   --backends LIST     file,s3 (default both)
#   --full-read-runs N  variant (b): once a whole-workspace read takes over 15 s (S3: ~50 s
#                       for 1 GiB), make it only in the first N runs (default 3); in the
#                       others the next handoff starts while B still fetches in the background
#   --no-drop-caches    keep the page cache (default: dropped before every handoff)
#   --out FILE          JSON lines (default target/bench-handoff/results.jsonl); the
#                       Markdown report goes to stdout and to FILE with .md
#   --owfs-bin PATH     use this owfs binary; do not build
#   --workdir DIR       scratch (default /var/tmp/owfs-bench-handoff; emptied first, removed
#                       at the end)
#   --keep              keep the scratch directory (daemon logs, moto log)
#   -h, --help          this text
# Needs root (FUSE mounts, drop_caches, umount -l), python3 with moto[server], curl. Every
# mount and daemon it started is cleaned up on exit, also on failure or Ctrl-C.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helper="$root/scripts/bench_handoff.py"
orig_args=("$@")

RUNS='' CRASH_RUNS='' IDLE='' FILES='' QUICK=0 BACKENDS=file,s3 FULL_READ_RUNS=3 DROP=1
OUT='' OWFS_BIN='' W=/var/tmp/owfs-bench-handoff KEEP=0

die() {
    echo "bench-handoff: error: $*" >&2
    exit 1
}
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
num() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 wants a whole number, not '$2'"; echo "$2"; }

while (($#)); do
    case $1 in
    --runs) RUNS=$(num "$1" "${2:-}"); shift 2 ;;
    --crash-runs) CRASH_RUNS=$(num "$1" "${2:-}"); shift 2 ;;
    --idle-seconds) IDLE=$(num "$1" "${2:-}"); shift 2 ;;
    --files) FILES=$(num "$1" "${2:-}"); shift 2 ;;
    --quick) QUICK=1; shift ;;
    --backends) BACKENDS=${2:?--backends needs a list}; shift 2 ;;
    --full-read-runs) FULL_READ_RUNS=$(num "$1" "${2:-}"); shift 2 ;;
    --no-drop-caches) DROP=0; shift ;;
    --out) OUT=${2:?--out needs a file}; shift 2 ;;
    --owfs-bin) OWFS_BIN=${2:?--owfs-bin needs a path}; shift 2 ;;
    --workdir) W=${2:?--workdir needs a directory}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-handoff: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done
if ((QUICK)); then
    RUNS=${RUNS:-5} CRASH_RUNS=${CRASH_RUNS:-2} IDLE=${IDLE:-30} FILES=${FILES:-16}
else
    RUNS=${RUNS:-20} CRASH_RUNS=${CRASH_RUNS:-5} IDLE=${IDLE:-120} FILES=${FILES:-64}
fi
((RUNS >= 1 && CRASH_RUNS >= 1 && FILES >= 1)) || die "--runs, --crash-runs and --files must be at least 1"
IFS=, read -r -a backends <<<"$BACKENDS"
for b in "${backends[@]}"; do [[ $b == file || $b == s3 ]] || die "unknown backend '$b' (file, s3)"; done

[[ $(id -u) -eq 0 ]] || die "run as root: FUSE mounts, drop_caches and umount -l need it"
case $W in / | /tmp | /tmp/ | /var/tmp | /var/tmp/ | "$HOME") die "--workdir $W: choose a dedicated directory" ;; esac
step() { echo "[$(date +%H:%M:%S)] bench-handoff: $*" >&2; }

# The real python3 (not a pyenv shim), so that moto's pid is the server's.
if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
PY=$(python3 -c 'import sys; print(sys.executable)') || die "python3 is missing"
for t in curl umount mountpoint cat; do command -v "$t" >/dev/null || die "$t is missing"; done
if [[ " ${backends[*]} " == *" s3 "* ]]; then
    "$PY" -c 'import moto.server' 2>/dev/null || die "moto's S3 server is missing (pip install 'moto[server]', or scripts/install-deps.sh)"
fi

if [[ -n $OUT ]]; then
    mkdir -p "$(dirname "$OUT")"
    OUT=$(realpath "$OUT")
else
    mkdir -p "$root/target/bench-handoff"
    OUT="$root/target/bench-handoff/results.jsonl"
fi
MD="${OUT%.jsonl}.md"
: >"$OUT"

# --- clean-up: every mount under the scratch directory, every daemon this run started -----------
# shellcheck source=scripts/lib-moto.sh
source "$root/scripts/lib-moto.sh"
helper_pid=
# shellcheck disable=SC2317 # run by the EXIT trap (shellcheck 0.9 takes the script's last exit for its end)
cleanup() {
    local rc=$? m p
    trap - EXIT INT TERM
    if [[ -n $helper_pid ]] && kill -0 "$helper_pid" 2>/dev/null; then
        kill "$helper_pid" 2>/dev/null || true
        wait "$helper_pid" 2>/dev/null || true
    fi
    # Mount points under $W, deepest first (awk: field 2 of /proc/mounts, octal escapes kept).
    if [[ -d $W ]]; then
        while read -r m; do
            [[ -n $m ]] || continue
            step "cleaning up: umount -l $m"
            umount -l "$m" 2>/dev/null || true
        done < <(awk -v w="$W/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r)
    fi
    # Daemons recorded by the helper (one pid a line), each by its pid, and only if that pid is
    # still an owfs daemon of this run (its command line names a directory under $W).
    if [[ -f $W/pids ]]; then
        while read -r p; do
            [[ $p =~ ^[0-9]+$ ]] || continue
            if [[ $(cat "/proc/$p/comm" 2>/dev/null) == owfs ]] &&
                grep -qaF "$W/" "/proc/$p/cmdline" 2>/dev/null; then
                step "cleaning up: daemon $p"
                kill "$p" 2>/dev/null || true
            fi
        done <"$W/pids"
    fi
    stop_moto
    if ((KEEP)); then
        step "scratch kept in $W"
    elif [[ -d $W ]]; then
        sleep 0.5
        rm -rf "$W" 2>/dev/null || step "could not remove all of $W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -d $W ]]; then
    awk -v w="$W/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
fi
rm -rf "$W"
mkdir -p "$W"

# --- owfs --------------------------------------------------------------------------------------
if [[ -z $OWFS_BIN ]]; then
    OWFS_BIN="$root/target/release/owfs"
    step "building owfs (cargo build --release -p owfs)"
    (cd "$root" && cargo build --release -p owfs) >"$W/build.log" 2>&1 || { tail -n 20 "$W/build.log" >&2; die "build failed"; }
fi
[[ -x $OWFS_BIN ]] || die "no owfs binary at $OWFS_BIN"
version=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')
git -C "$root" diff --quiet HEAD -- owfs chunkstore vfs lease 2>/dev/null || version+="+uncommitted changes"
if ! "$OWFS_BIN" mount --help 2>/dev/null | grep -q -- --prefetch-only; then
    die "this owfs has no \`mount --prefetch-only\`: the pre-pull variant cannot run (build a newer owfs)"
fi

# --- the S3 server -----------------------------------------------------------------------------
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
moto_log="$W/moto.log"
moto_version=
if [[ " ${backends[*]} " == *" s3 "* ]]; then
    moto_version=$("$PY" -c 'import moto; print(moto.__version__)' 2>/dev/null || echo '?')
    start_moto "$moto_log" "$PY" -m moto.server || die "moto_server did not start; see $moto_log"
    "$PY" "$helper" mkbucket "$endpoint" hb-hand
    "$PY" "$helper" mkbucket "$endpoint" hb-hand-idle
    step "moto_server at $endpoint (pid $moto_pid), buckets hb-hand and hb-hand-idle"
fi

# --- run ---------------------------------------------------------------------------------------
command="scripts/bench-handoff.sh${orig_args[*]:+ ${orig_args[*]}}"
args=(run --owfs "$OWFS_BIN" --workdir "$W" --out "$OUT" --backends "$BACKENDS" --files "$FILES"
    --runs "$RUNS" --crash-runs "$CRASH_RUNS" --idle-seconds "$IDLE" --full-read-runs "$FULL_READ_RUNS"
    --command "$command" --version "$version")
[[ -n $endpoint ]] && args+=(--endpoint "$endpoint" --bucket hb-hand --moto-log "$moto_log" --moto-version "$moto_version")
((DROP)) || args+=(--no-drop-caches)
t_start=$(date +%s)
step "files: $FILES x 16 MiB; runs: $RUNS per variant, crash runs: $CRASH_RUNS, idle: $IDLE s; results: $OUT"
"$PY" "$helper" "${args[@]}" &
helper_pid=$!
rc=0
wait "$helper_pid" || rc=$?
helper_pid=
step "done in $(($(date +%s) - t_start)) s (helper exit $rc)"
echo
"$PY" "$helper" report "$OUT" --md "$MD"
step "report: $MD; raw results: $OUT"
exit "$rc"
