#!/usr/bin/env bash
# Storage-core benchmark: `owfs snapshot` / `owfs restore` against `cp -a` and `restic`, on the
# same data, in one run, against a file:// store and against S3 (moto_server on loopback).
#
# Measures (see docs/PERFORMANCE.md, "Storage core (snapshot / restore)"):
#   - first snapshot of a deterministic ~1 GiB mixed tree (time, peak RSS, bytes stored,
#     objects, PUTs) vs cp -a and restic backup;
#   - restore of it vs restic restore and cp -a back;
#   - a second snapshot after ~1 MiB changed (time, bytes the store grew by, PUTs);
#   - a first snapshot of 10,000 small files (time, PUTs);
#   - snapshot and restore of 100,000 small files (time, peak RSS).
# Every timed step runs REPS times (median reported) except the 100,000-file tree (once).
# Wall times include a final `sync` (what a tool wrote is on disk); peak RSS is GNU time's %M
# of the tool alone (GNU time, as `time -v` reports it). With DROP_CACHES=1 (default, needs root) the page cache is dropped
# before every timed step (cold cache); otherwise caches are warm.
#
# Usage: scripts/bench-storage.sh
# Environment (all optional):
#   BENCH_DIR=/var/tmp/owfs-bench   scratch directory (removed at the end unless KEEP=1)
#   BENCH_OUT=target/bench-storage  where results.tsv, table.md and env.md are kept
#   REPS=3  BACKENDS="file s3"  DROP_CACHES=1
#   SCALE=1.0 (size factor of the mixed tree)  S3_SCALE=$SCALE (of the S3 rows' mixed tree)
#   SMALL100K=1 (0 skips the 100,000-file rows)
# Needs: cargo, python3, restic, GNU time (/usr/bin/time), curl, moto_server (pip install
# 'moto[server]'; also brings boto3, used to measure buckets).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

W=${BENCH_DIR:-/var/tmp/owfs-bench}
OUT=${BENCH_OUT:-$root/target/bench-storage}
REPS=${REPS:-3}
BACKENDS=${BACKENDS:-file s3}
DROP_CACHES=${DROP_CACHES:-1}
SCALE=${SCALE:-1.0}
S3_SCALE=${S3_SCALE:-$SCALE}
SMALL100K=${SMALL100K:-1}
KEEP=${KEEP:-0}
helper="$root/scripts/gen_tree.py"
owfs="$root/target/release/owfs"
t_start=$(date +%s)

step() { echo "[$(date -u +%H:%M:%S)] bench: $*" >&2; }
die() {
    echo "bench-storage.sh: error: $*" >&2
    exit 1
}

for tool in python3 restic curl; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
[[ -x /usr/bin/time ]] || die "GNU time is missing (apt-get install -y time)"

# --- scratch, moto, clean-up ------------------------------------------------------------------
# shellcheck source=scripts/lib-moto.sh
source "$root/scripts/lib-moto.sh"
cleanup() {
    stop_moto
    if [[ $KEEP != 1 && -d $W ]]; then
        chmod -R u+w "$W" 2>/dev/null || true
        rm -rf "$W"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

case $W in /tmp | /tmp/ | / | "$HOME") die "BENCH_DIR=$W: choose a dedicated directory" ;; esac
rm -rf "$W"
mkdir -p "$W/logs" "$OUT"
results="$W/results.tsv"
: >"$results"
export RESTIC_PASSWORD=owfs-bench RESTIC_CACHE_DIR="$W/restic-cache"

if [[ $DROP_CACHES == 1 ]]; then
    if ! (sync && echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
        step "cannot drop the page cache (not root?): caches stay warm"
        DROP_CACHES=0
    fi
fi
drop() {
    sync
    if [[ $DROP_CACHES == 1 ]]; then echo 3 >/proc/sys/vm/drop_caches; fi
}

# record BACKEND METRIC TOOL VALUE
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$results"; }

# timed NAME CMD...: runs CMD (stdout/stderr to logs/NAME.{out,err}), then sync. Sets
# T_WALL (seconds, including the sync) and T_RSS (KiB, the tool's peak RSS).
timed() {
    local name=$1
    shift
    local t0 t1
    t0=$(date +%s.%N)
    if ! /usr/bin/time -f '%M' -o "$W/logs/$name.time" "$@" >"$W/logs/$name.out" 2>"$W/logs/$name.err"; then
        tail -n 20 "$W/logs/$name.err" >&2
        die "$name failed: $*"
    fi
    sync
    t1=$(date +%s.%N)
    T_WALL=$(python3 -c "print(round($t1 - $t0, 3))")
    T_RSS=$(tail -n 1 "$W/logs/$name.time")
}

# jget FILE a.b.c: a field of a JSON document.
jget() {
    python3 -c 'import json,sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): v = v[k]
print(v)' "$1" "$2"
}

count_files() { find "$1" -type f | wc -l; }

# --- build -----------------------------------------------------------------------------------
step "cargo build --release -p owfs"
cargo build --release -p owfs --quiet
"$owfs" --version >/dev/null
build_rev="$(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- chunkstore owfs Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted changes to chunkstore/owfs')"

# --- test data -------------------------------------------------------------------------------
step "generating the mixed tree (~1 GiB, seed 42), 10,000 and 100,000 small files"
python3 "$helper" mixed "$W/tree-mixed" --seed 42 --scale "$SCALE"
python3 "$helper" small "$W/tree-10k" --files 10000 --dirs 100 --min 1024 --max 4096 --seed 7
if [[ $SMALL100K == 1 ]]; then
    python3 "$helper" small "$W/tree-100k" --files 100000 --dirs 1000 --min 1024 --max 4096 --seed 8
fi

# --- stores ----------------------------------------------------------------------------------
# new_stores BACKEND TAG: fresh, empty owfs store and restic repository; sets OWFS_URL,
# RESTIC_REPO, and (for s3) OWFS_BUCKET/RESTIC_BUCKET.
endpoint=
new_stores() {
    local be=$1 tag=$2
    case $be in
    file)
        OWFS_URL="file://$W/store/owfs-$tag"
        RESTIC_REPO="$W/store/restic-$tag"
        mkdir -p "$W/store"
        ;;
    s3)
        OWFS_BUCKET="owfs-$tag"
        RESTIC_BUCKET="restic-$tag"
        curl -sf -X PUT "$endpoint/$OWFS_BUCKET" >/dev/null
        curl -sf -X PUT "$endpoint/$RESTIC_BUCKET" >/dev/null
        OWFS_URL="s3://$OWFS_BUCKET/store"
        RESTIC_REPO="s3:$endpoint/$RESTIC_BUCKET"
        ;;
    esac
    restic -r "$RESTIC_REPO" init >"$W/logs/restic-init-$be-$tag.log" 2>&1 ||
        die "restic init failed: $(cat "$W/logs/restic-init-$be-$tag.log")"
}

# usage BACKEND TOOL: "<objects> <bytes>" of the current owfs store or restic repository.
usage() {
    local be=$1 tool=$2
    case $be in
    file)
        local d=$RESTIC_REPO
        [[ $tool == owfs ]] && d=${OWFS_URL#file://}
        echo "$(count_files "$d") $(du -sb "$d" | cut -f1)"
        ;;
    s3)
        local b=$RESTIC_BUCKET
        [[ $tool == owfs ]] && b=$OWFS_BUCKET
        python3 "$helper" s3-usage "$endpoint" "$b"
        ;;
    esac
}

# restic_puts BACKEND: PUT requests restic has made to its repository so far (s3: from the
# server's request log; file: files in the repository, i.e. lock files not counted).
restic_puts() {
    case $1 in
    file) count_files "$RESTIC_REPO" ;;
    s3)
        sleep 0.3
        grep -c "\"PUT /$RESTIC_BUCKET/" "$moto_log" || true
        ;;
    esac
}

moto_reset() {
    [[ $1 == s3 ]] && curl -sf -X POST "$endpoint/moto-api/reset" >/dev/null
    return 0
}

owfs_() { "$owfs" --store "$OWFS_URL" "$@"; }

# --- one backend -----------------------------------------------------------------------------
bench_backend() {
    local be=$1 tree=$2 i rest before after
    record "$be" tree_bytes mixed "$(du -sb "$tree" | cut -f1)"
    record "$be" tree_files mixed "$(count_files "$tree")"

    step "[$be] first snapshot of the mixed tree, $REPS times each: owfs, cp -a, restic"
    for i in $(seq "$REPS"); do
        moto_reset "$be"
        rm -rf "$W/store" "$W/copy"
        new_stores "$be" "mixed$i"
        drop
        timed "$be-snap1-owfs-$i" "$owfs" --store "$OWFS_URL" --json snapshot "$tree" ws
        record "$be" snap1_s owfs "$T_WALL"
        record "$be" snap1_rss owfs "$T_RSS"
        record "$be" puts1 owfs "$(jget "$W/logs/$be-snap1-owfs-$i.out" requests.puts)"
        if [[ $be == s3 ]]; then
            sleep 0.3
            record "$be" puts1_server_log owfs "$(grep -c "\"PUT /$OWFS_BUCKET/" "$moto_log" || true)"
        fi
        drop
        timed "$be-snap1-cp-$i" cp -a "$tree" "$W/copy"
        record "$be" snap1_s cp "$T_WALL"
        record "$be" snap1_rss cp "$T_RSS"
        before=$(restic_puts "$be")
        drop
        timed "$be-snap1-restic-$i" restic -r "$RESTIC_REPO" backup "$tree"
        record "$be" snap1_s restic "$T_WALL"
        record "$be" snap1_rss restic "$T_RSS"
        after=$(restic_puts "$be")
        record "$be" puts1 restic "$((after - before))"
        step "[$be]   rep $i: $(grep -P "^$be\tsnap1_s\t" "$results" | tail -n 3 | cut -f3,4 | paste -sd' ') (s)"
    done
    read -r n b < <(usage "$be" owfs)
    record "$be" objects owfs "$n"
    record "$be" stored_bytes owfs "$b"
    read -r n b < <(usage "$be" restic)
    record "$be" objects restic "$n"
    record "$be" stored_bytes restic "$b"
    record "$be" stored_bytes cp "$(du -sb "$W/copy" | cut -f1)"

    step "[$be] restore of the mixed tree, $REPS times each: owfs, restic, cp -a back"
    for i in $(seq "$REPS"); do
        rest="$W/restore"
        rm -rf "$rest"
        mkdir -p "$rest"
        drop
        timed "$be-restore-owfs-$i" "$owfs" --store "$OWFS_URL" --json restore ws "$rest/owfs"
        record "$be" restore_s owfs "$T_WALL"
        record "$be" restore_rss owfs "$T_RSS"
        drop
        timed "$be-restore-restic-$i" restic -r "$RESTIC_REPO" restore latest --target "$rest/restic"
        record "$be" restore_s restic "$T_WALL"
        record "$be" restore_rss restic "$T_RSS"
        drop
        timed "$be-restore-cp-$i" cp -a "$W/copy" "$rest/cp"
        record "$be" restore_s cp "$T_WALL"
        record "$be" restore_rss cp "$T_RSS"
        if [[ $i == 1 ]]; then
            if diff -r --no-dereference "$tree" "$rest/owfs" >"$W/logs/$be-diff.log" 2>&1; then
                record "$be" restore_identical owfs 1
            else
                record "$be" restore_identical owfs 0
                step "[$be] WARNING: owfs restore differs from the tree: $(head -n 5 "$W/logs/$be-diff.log")"
            fi
        fi
        rm -rf "$rest"
    done

    step "[$be] second snapshot after ~1 MiB changed, $REPS rounds: owfs, restic"
    for i in $(seq "$REPS"); do
        # Rounds differ per backend so each backend sees fresh changes.
        python3 "$helper" mutate "$tree" --round "$([[ $be == file ]] && echo "$i" || echo $((i + 10)))"
        read -r n before < <(usage "$be" owfs)
        drop
        timed "$be-snap2-owfs-$i" "$owfs" --store "$OWFS_URL" --json snapshot "$tree" ws
        record "$be" snap2_s owfs "$T_WALL"
        record "$be" snap2_raw owfs "$(jget "$W/logs/$be-snap2-owfs-$i.out" write.raw_bytes_new)"
        record "$be" snap2_read owfs "$(jget "$W/logs/$be-snap2-owfs-$i.out" tree.bytes_read)"
        record "$be" puts2 owfs "$(jget "$W/logs/$be-snap2-owfs-$i.out" requests.puts)"
        read -r n after < <(usage "$be" owfs)
        record "$be" snap2_stored owfs "$((after - before))"
        read -r n before < <(usage "$be" restic)
        local p0
        p0=$(restic_puts "$be")
        drop
        timed "$be-snap2-restic-$i" restic -r "$RESTIC_REPO" backup "$tree"
        record "$be" snap2_s restic "$T_WALL"
        read -r raw _ < <(python3 "$helper" restic-added "$W/logs/$be-snap2-restic-$i.out")
        record "$be" snap2_raw restic "$raw"
        record "$be" puts2 restic "$(($(restic_puts "$be") - p0))"
        read -r n after < <(usage "$be" restic)
        record "$be" snap2_stored restic "$((after - before))"
    done

    step "[$be] first snapshot of 10,000 small files, $REPS times each: owfs, cp -a, restic"
    for i in $(seq "$REPS"); do
        moto_reset "$be"
        rm -rf "$W/store" "$W/copy"
        new_stores "$be" "small$i"
        drop
        timed "$be-small10k-owfs-$i" "$owfs" --store "$OWFS_URL" --json snapshot "$W/tree-10k" ws
        record "$be" small10k_s owfs "$T_WALL"
        record "$be" small10k_puts owfs "$(jget "$W/logs/$be-small10k-owfs-$i.out" requests.puts)"
        drop
        timed "$be-small10k-cp-$i" cp -a "$W/tree-10k" "$W/copy"
        record "$be" small10k_s cp "$T_WALL"
        before=$(restic_puts "$be")
        drop
        timed "$be-small10k-restic-$i" restic -r "$RESTIC_REPO" backup "$W/tree-10k"
        record "$be" small10k_s restic "$T_WALL"
        record "$be" small10k_puts restic "$(($(restic_puts "$be") - before))"
    done
    read -r n b < <(usage "$be" owfs)
    record "$be" small10k_bytes owfs "$b"
    read -r n b < <(usage "$be" restic)
    record "$be" small10k_bytes restic "$b"

    if [[ $SMALL100K == 1 ]]; then
        step "[$be] 100,000 small files, once: snapshot and restore, owfs, restic, cp -a"
        moto_reset "$be"
        rm -rf "$W/store" "$W/copy"
        new_stores "$be" "small100k"
        drop
        timed "$be-small100k-owfs" "$owfs" --store "$OWFS_URL" --json snapshot "$W/tree-100k" ws
        record "$be" small100k_s owfs "$T_WALL"
        record "$be" small100k_rss owfs "$T_RSS"
        record "$be" small100k_puts owfs "$(jget "$W/logs/$be-small100k-owfs.out" requests.puts)"
        drop
        timed "$be-small100k-cp" cp -a "$W/tree-100k" "$W/copy"
        record "$be" small100k_s cp "$T_WALL"
        record "$be" small100k_rss cp "$T_RSS"
        before=$(restic_puts "$be")
        drop
        timed "$be-small100k-restic" restic -r "$RESTIC_REPO" backup "$W/tree-100k"
        record "$be" small100k_s restic "$T_WALL"
        record "$be" small100k_rss restic "$T_RSS"
        record "$be" small100k_puts restic "$(($(restic_puts "$be") - before))"
        rest="$W/restore"
        rm -rf "$rest"
        mkdir -p "$rest"
        drop
        timed "$be-small100k-restore-owfs" "$owfs" --store "$OWFS_URL" --json restore ws "$rest/owfs"
        record "$be" small100k_restore_s owfs "$T_WALL"
        record "$be" small100k_restore_rss owfs "$T_RSS"
        drop
        timed "$be-small100k-restore-restic" restic -r "$RESTIC_REPO" restore latest --target "$rest/restic"
        record "$be" small100k_restore_s restic "$T_WALL"
        record "$be" small100k_restore_rss restic "$T_RSS"
        drop
        timed "$be-small100k-restore-cp" cp -a "$W/copy" "$rest/cp"
        record "$be" small100k_restore_s cp "$T_WALL"
        record "$be" small100k_restore_rss cp "$T_RSS"
        rm -rf "$rest" "$W/copy"
    fi
    moto_reset "$be"
    rm -rf "$W/store" "$W/copy"
}

# --- run -------------------------------------------------------------------------------------
for be in $BACKENDS; do
    case $be in
    file)
        bench_backend file "$W/tree-mixed"
        ;;
    s3)
        if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
        command -v moto_server >/dev/null || die "moto_server is missing (pip install 'moto[server]')"
        moto_log="$W/moto.log"
        start_moto "$moto_log" moto_server || die "moto_server did not start; see $moto_log"
        step "moto_server at $endpoint (pid $moto_pid)"
        export AWS_ENDPOINT_URL="$endpoint" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
        export AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1
        s3tree="$W/tree-mixed"
        if [[ $S3_SCALE != "$SCALE" ]]; then
            s3tree="$W/tree-mixed-s3"
            python3 "$helper" mixed "$s3tree" --seed 42 --scale "$S3_SCALE"
        fi
        bench_backend s3 "$s3tree"
        record s3 moto_peak_rss_kib moto "$(awk '/VmHWM/ {print $2}' "/proc/$moto_pid/status" 2>/dev/null || echo 0)"
        stop_moto
        ;;
    *) die "unknown backend $be (file, s3)" ;;
    esac
done

# --- report ----------------------------------------------------------------------------------
elapsed=$(($(date +%s) - t_start))
{
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM (free -g), kernel $(uname -r)"
    echo "- Scratch filesystem: $(df -hT "$W" | awk 'NR==2 {print $2 " on " $1}')"
    echo "- Commit: $build_rev"
    echo "- Command: \`scripts/bench-storage.sh\` (REPS=$REPS SCALE=$SCALE S3_SCALE=$S3_SCALE BACKENDS=\"$BACKENDS\" DROP_CACHES=$DROP_CACHES SMALL100K=$SMALL100K)"
    echo "- Versions: $("$owfs" --version), $(restic version | cut -d' ' -f1-2), moto $(python3 -c 'import moto; print(moto.__version__)' 2>/dev/null || echo '?'), $(cp --version | head -n 1)"
    echo "- Page cache: $([[ $DROP_CACHES == 1 ]] && echo 'dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed step' || echo 'warm (not dropped)')"
    echo "- Repetitions: $REPS (median reported); whole run: ${elapsed} s"
} >"$OUT/env.md"
cp "$results" "$OUT/results.tsv"
python3 "$helper" table "$results" >"$OUT/table.md"
cat "$OUT/env.md" "$OUT/table.md"
step "done in ${elapsed} s; results in $OUT"
