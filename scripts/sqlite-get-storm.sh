#!/usr/bin/env bash
# Reproduces the GET storm the SQLite benchmark found at 1 GiB (docs/PERFORMANCE.md, "A partial
# rerun at 1 GiB"): a WAL database on an S3 mount (moto on loopback), built with 5,000-row
# transactions of the benchmark's rows (random 62-bit key with an index on it, 272 random hex
# characters), then one-row transactions at 20 a second (70% update a random row, 30% insert);
# prints the transactions, the commits and the store requests the daemon counted meanwhile.
#
# Usage: scripts/sqlite-get-storm.sh [ROWS [SECONDS [OWFS_BINARY]]]
#   ROWS     rows to build (default 3200000, about 1 GiB)
#   SECONDS  seconds of steady transactions (default 120)
# Measured 2026-12-07 (release build): 3,200,000 rows, 120 s: 2,372 transactions, 46 commits,
# 9,459 GETs and 31 GB read from the store (the same with constant row values and no index:
# 13 GETs). The database capture walked the clean database's whole part list from the store
# at every commit; with the list kept in memory: 3,000,000 rows, 60 s, 58 commits, 0 GETs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rows=${1:-3200000}
secs=${2:-120}
export OWFS=${3:-$root/target/release/owfs}
[[ -x $OWFS ]] || { echo "no $OWFS: cargo build --release -p owfs" >&2; exit 2; }
work=$(mktemp -d /var/tmp/owfs-get-storm.XXXXXX)
# shellcheck source=scripts/lib-moto.sh
source "$root/scripts/lib-moto.sh"
cleanup() {
    "$OWFS" umount "$work/mnt" >/dev/null 2>&1 || umount -l "$work/mnt" 2>/dev/null || true
    stop_moto
    rm -rf "$work"
}
trap cleanup EXIT
start_moto "$work/moto.log" moto_server
export AWS_ENDPOINT_URL=$endpoint AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing
export AWS_REGION=us-east-1
curl -sf -X PUT "$endpoint/getstorm" >/dev/null
mkdir -p "$work/mnt"
"$OWFS" --store s3://getstorm/x mount ws "$work/mnt" --cache-dir "$work/cache" >/dev/null
python3 - "$work/mnt" "$rows" "$secs" <<'PY'
import json, os, random, sqlite3, subprocess, sys, time
mnt, rows, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
owfs = os.environ["OWFS"]
rng = random.Random(1)
db = sqlite3.connect(f"{mnt}/app.db")
db.execute("pragma journal_mode=wal")
db.execute("pragma synchronous=normal")
db.execute("create table t(id integer primary key, k integer not null, seq int, v text)")
db.execute("create index t_k on t(k)")
for _ in range(0, rows, 5000):
    db.executemany("insert into t(k, v, seq) values (?, ?, 0)",
                   [(rng.getrandbits(62), rng.randbytes(136).hex()) for _ in range(5000)])
    db.commit()
status = lambda: json.loads(subprocess.check_output([owfs, "status", mnt, "--json"]))
subprocess.check_call([owfs, "sync", mnt], stdout=subprocess.DEVNULL)
time.sleep(3)
s0, t0, n = status(), time.time(), 0
while time.time() - t0 < secs:
    n += 1
    if rng.random() < 0.7:
        db.execute("update t set seq = ?, v = ? where id = ?",
                   (n, rng.randbytes(136).hex(), rng.randint(1, rows)))
    else:
        db.execute("insert into t(k, v, seq) values (?, ?, ?)",
                   (rng.getrandbits(62), rng.randbytes(136).hex(), n))
    db.commit()
    time.sleep(0.05)
s1 = status()
req = {k: s1["requests"][k] - s0["requests"][k] for k in s1["requests"]}
print(json.dumps({"rows": rows, "seconds": secs, "transactions": n,
                  "commits": s1["commits"] - s0["commits"], "requests": req}))
PY
