#!/usr/bin/env python3
"""Workloads and bookkeeping for scripts/bench-mount.sh (the side-by-side mount benchmark).

Subcommands (the shell script drives them; each prints JSON or Markdown on stdout):

  run DIR WORKLOAD [options]   run one workload in DIR (a fresh directory on the file system
                               under test) and print one JSON line per phase: wall seconds,
                               and, when --pids / --reqlog are given, the daemon's peak RSS and
                               CPU seconds and the store requests it caused (settling included)
  idle SECONDS [options]       measure a mounted, untouched file system for SECONDS
  settle [options]             wait until the store log is quiet; print what arrived meanwhile
  pids PATH...                 pids of the processes whose command line names a PATH
  freeport                     print a free TCP port on 127.0.0.1
  mkbucket ENDPOINT NAME       create bucket NAME on an (unauthenticated) moto S3 server
  report RESULTS.jsonl         the Markdown tables of a run

Workloads (sizes are the defaults; --quick in the shell script passes smaller ones):
  buf4k   write 64 MiB in 4 KiB write() calls, close (no fsync)       -> phase write4k
          drop caches, read it back in 4 KiB read() calls             -> phase read4k_cold
          read it again without dropping caches                       -> phase read4k_warm
  seq1m   write 256 MiB in 1 MiB write() calls, fsync, close          -> phase seqwrite1m
  fsync4k 500 x (append 4 KiB, fsync)                                 -> phase fsync4k
  meta    10,000 empty files: create; drop caches, stat; rename; unlink  -> 4 phases + sum
  tree    tar -xzf a .crate (gzip tarball of a Rust crate's source)   -> phase untar
          git init, git add -A, git commit                            -> phase git
  sqlite  2,000 single-row INSERT transactions, WAL mode, synchronous=NORMAL, then FULL
                                                                      -> sqlite_normal, sqlite_full

"Drop caches" is `sync; echo 3 > /proc/sys/vm/drop_caches`: the kernel's page, dentry and
inode caches go, a system's own on-disk cache (JuiceFS, rclone, s3fs use_cache, owfs's
working copy) stays. Data written is random (os.urandom), so no system can deduplicate it.
"""

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the checkout
from benchlib import MOTO_REQUEST, add_store_commands, proc_cpu_s, write_report  # noqa: E402

# --- workloads (run in a child process) --------------------------------------------------------

KIB = 1024
MIB = 1024 * 1024

PHASES = {
    "buf4k": ["write4k", "read4k_cold", "read4k_warm"],
    "seq1m": ["seqwrite1m"],
    "fsync4k": ["fsync4k"],
    "meta": ["meta_create", "meta_stat", "meta_rename", "meta_unlink"],
    "tree": ["untar", "git"],
    "sqlite": ["sqlite_normal", "sqlite_full"],
}
# Phases that start with a dropped page cache (cold).
COLD = {"read4k_cold", "meta_stat"}
READ_ONLY = {"read4k_cold", "read4k_warm", "meta_stat"}


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class Work:
    """The phases of every workload; each method is one timed phase (setup outside the timer)."""

    def __init__(self, d, a, progress):
        self.d = d
        self.a = a
        self.progress = progress  # operations done in the current phase (shared with the parent)

    def _tick(self, i):
        if i % 50 == 0:
            self.progress.value = i

    def _timed(self, fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # buf4k
    def write4k(self):
        data = os.urandom(self.a.buf_mib * MIB)
        mv = memoryview(data)
        path = os.path.join(self.d, "buf4k.bin")

        def go():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for off in range(0, len(data), 4 * KIB):
                os.write(fd, mv[off : off + 4 * KIB])
            os.close(fd)

        t = self._timed(go)
        self.buf_sha = hashlib.sha256(data).hexdigest()
        return t

    def _read4k(self):
        """Reads back what write4k wrote, and checks it (size and SHA-256, after the timer)."""
        path = os.path.join(self.d, "buf4k.bin")
        want = self.a.buf_mib * MIB
        got = []

        def go():
            fd = os.open(path, os.O_RDONLY)
            while True:
                b = os.read(fd, 4 * KIB)
                if not b:
                    break
                got.append(b)
            os.close(fd)

        t = self._timed(go)
        n = sum(len(b) for b in got)
        if n != want:
            raise RuntimeError(f"read {n} bytes, expected {want}")
        h = hashlib.sha256()
        for b in got:
            h.update(b)
        if h.hexdigest() != getattr(self, "buf_sha", None):
            raise RuntimeError("read back different bytes than were written (SHA-256 differs)")
        return t

    def read4k_cold(self):
        return self._read4k()

    def read4k_warm(self):
        return self._read4k()

    # seq1m
    def seqwrite1m(self):
        data = os.urandom(self.a.seq_mib * MIB)
        mv = memoryview(data)
        path = os.path.join(self.d, "seq1m.bin")

        def go():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for off in range(0, len(data), MIB):
                os.write(fd, mv[off : off + MIB])
            os.fsync(fd)
            os.close(fd)

        return self._timed(go)

    # fsync4k
    def fsync4k(self):
        blocks = [os.urandom(4 * KIB) for _ in range(self.a.fsync_n)]
        path = os.path.join(self.d, "fsync4k.log")

        def go():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            for i, b in enumerate(blocks):
                self._tick(i)
                os.write(fd, b)
                os.fsync(fd)
            os.close(fd)

        return self._timed(go)

    # meta
    def _mdir(self):
        return os.path.join(self.d, "m")

    def meta_create(self):
        m = self._mdir()
        os.mkdir(m)
        names = [os.path.join(m, f"f{i:05d}") for i in range(self.a.meta_n)]

        def go():
            for i, p in enumerate(names):
                self._tick(i)
                os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

        return self._timed(go)

    def meta_stat(self):
        m = self._mdir()
        names = [os.path.join(m, f"f{i:05d}") for i in range(self.a.meta_n)]
        def go():
            for i, p in enumerate(names):
                self._tick(i)
                os.stat(p)

        return self._timed(go)

    def meta_rename(self):
        m = self._mdir()
        pairs = [
            (os.path.join(m, f"f{i:05d}"), os.path.join(m, f"r{i:05d}")) for i in range(self.a.meta_n)
        ]

        def go():
            for i, (a, b) in enumerate(pairs):
                self._tick(i)
                os.rename(a, b)

        return self._timed(go)

    def meta_unlink(self):
        m = self._mdir()
        names = [os.path.join(m, f"r{i:05d}") for i in range(self.a.meta_n)]

        def go():
            for i, p in enumerate(names):
                self._tick(i)
                os.unlink(p)

        return self._timed(go)

    # tree
    def untar(self):
        t = os.path.join(self.d, "t")
        os.mkdir(t)
        return self._timed(
            lambda: subprocess.run(["tar", "-xzf", self.a.tarball, "-C", t], check=True)
        )

    def git(self):
        t = os.path.join(self.d, "t")
        (top,) = os.listdir(t)
        repo = os.path.join(t, top)
        env = dict(os.environ)
        env.update(
            GIT_CONFIG_NOSYSTEM="1",
            GIT_CONFIG_GLOBAL="/dev/null",
            GIT_CONFIG_COUNT="1",
            GIT_CONFIG_KEY_0="safe.directory",
            GIT_CONFIG_VALUE_0="*",
            GIT_AUTHOR_NAME="bench",
            GIT_AUTHOR_EMAIL="bench@example.invalid",
            GIT_COMMITTER_NAME="bench",
            GIT_COMMITTER_EMAIL="bench@example.invalid",
        )

        def go():
            for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "bench"]):
                r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
                if r.returncode:
                    raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()[-300:]}")

        return self._timed(go)

    # sqlite
    def _sqlite(self, sync):
        import sqlite3

        path = os.path.join(self.d, f"app-{sync.lower()}.db")
        con = sqlite3.connect(path, isolation_level=None)
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"journal_mode=WAL refused (got {mode})")
        con.execute(f"PRAGMA synchronous={sync}")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        payloads = [os.urandom(100) for _ in range(self.a.sqlite_n)]

        def go():
            for i, p in enumerate(payloads):
                self._tick(i)
                con.execute("BEGIN")
                con.execute("INSERT INTO t (v) VALUES (?)", (p,))
                con.execute("COMMIT")

        try:
            return self._timed(go)
        finally:
            con.close()

    def sqlite_normal(self):
        return self._sqlite("NORMAL")

    def sqlite_full(self):
        return self._sqlite("FULL")


# Operations per phase, for "how far did it get" when a phase times out.
TOTAL = {
    "fsync4k": "fsync_n",
    "meta_create": "meta_n",
    "meta_stat": "meta_n",
    "meta_rename": "meta_n",
    "meta_unlink": "meta_n",
    "sqlite_normal": "sqlite_n",
    "sqlite_full": "sqlite_n",
}


def child_main(conn, d, a, progress):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    w = Work(d, a, progress)
    while True:
        phase = conn.recv()
        if phase is None:
            return
        progress.value = 0
        try:
            conn.send(("ok", getattr(w, phase)()))
        except Exception as e:  # report, do not die: the parent records the error
            conn.send(("error", f"{type(e).__name__}: {e}"[:300]))


# --- measuring the daemon and the store -------------------------------------------------------


def proc_rss_kib(pid, field="VmRSS"):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_hwm(pids):
    for p in pids:
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5\n")  # resets VmHWM to the current RSS
        except OSError:
            pass


def classify(method, path):
    path = path.split("?", 1)[0].strip("/")
    if method == "PUT":
        return "PUT"
    if method == "GET":
        return "LIST" if "/" not in path else "GET"
    return "other"  # HEAD, DELETE, POST (multipart, multi-delete)


class Meter:
    """Daemon RSS/CPU and store requests (lines of moto's request log) between marks."""

    def __init__(self, pids, reqlog):
        self.pids = [p for p in pids if p]
        self.reqlog = reqlog
        self.pos = os.path.getsize(reqlog) if reqlog else 0
        self.peak = 0

    def alive_pids(self):
        return [p for p in self.pids if os.path.exists(f"/proc/{p}")]

    def start(self):
        if self.reqlog:
            self.pos = os.path.getsize(self.reqlog)
        reset_hwm(self.pids)
        self.peak = self.rss()
        self.cpu0 = self.cpu()

    def rss(self):
        return sum(proc_rss_kib(p) for p in self.pids)

    def cpu(self):
        return sum(proc_cpu_s(p) or 0.0 for p in self.pids)

    def sample(self):
        self.peak = max(self.peak, self.rss())

    def log_size(self):
        return os.path.getsize(self.reqlog) if self.reqlog else 0

    def settle(self, quiet, limit):
        """Wait until the store log has not grown for `quiet` s (at most `limit` s); returns the
        seconds from now until the last request seen."""
        if not self.reqlog or not self.pids:
            return 0.0
        t0 = time.monotonic()
        last_size, last_change = self.log_size(), t0
        while True:
            time.sleep(0.1)
            self.sample()
            now = time.monotonic()
            size = self.log_size()
            if size != last_size:
                last_size, last_change = size, now
            if now - last_change >= quiet or now - t0 >= limit:
                return round(last_change - t0, 2)

    def stop(self):
        hwm = sum(proc_rss_kib(p, "VmHWM") for p in self.pids)
        out = {}
        if self.pids:
            out["rss_kib"] = max(self.peak, hwm)
            out["cpu_s"] = round(self.cpu() - self.cpu0, 3)
        if self.reqlog:
            counts = {"PUT": 0, "GET": 0, "LIST": 0, "other": 0}
            with open(self.reqlog, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
            # Only whole lines; a partial last line is counted next time.
            end = chunk.rfind(b"\n") + 1
            self.pos += end
            for line in chunk[:end].decode("utf-8", "replace").splitlines():
                m = MOTO_REQUEST.search(line)
                if m:
                    counts[classify(m.group(1), m.group(2))] += 1
            out["req"] = counts
        return out


# --- subcommands ------------------------------------------------------------------------------


def emit(rec):
    print(json.dumps(rec), flush=True)


def cmd_run(a):
    os.makedirs(a.dir, exist_ok=True)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    progress = ctx.Value("q", 0, lock=False)
    proc = ctx.Process(target=child_main, args=(child, a.dir, a, progress), daemon=True)
    proc.start()
    meter = Meter([int(p) for p in a.pids.split(",") if p], a.reqlog)
    base = dict(system=a.system, run=a.run, workload=a.workload)
    status = None  # once set ("timeout"/"error"), the remaining phases are skipped
    for phase in PHASES[a.workload]:
        rec = dict(base, phase=phase)
        if status:
            emit(dict(rec, status="skipped"))
            continue
        if phase in COLD:
            drop_caches()
        meter.start()
        parent.send(phase)
        t0 = time.monotonic()
        while not parent.poll(0.05):
            meter.sample()
            if time.monotonic() - t0 > a.timeout or not proc.is_alive():
                break
        if parent.poll(0):
            kind, val = parent.recv()
            if kind == "ok":
                rec["seconds"] = round(val, 4)
            else:
                status = "error"
                rec.update(status="error", error=val)
        else:
            status = "timeout" if proc.is_alive() else "error"
            rec.update(status=status, limit=a.timeout)
            if phase in TOTAL:
                rec["done"] = [progress.value, getattr(a, TOTAL[phase])]
            if status == "error":
                rec["error"] = f"workload process died (exit {proc.exitcode})"
            proc.kill()
            proc.join(10)
        # Read-only phases cause no uploads: no waiting for the store after them.
        if phase not in READ_ONLY:
            rec["settle_s"] = meter.settle(a.settle_quiet, a.settle_max)
        rec.update(meter.stop())
        emit(rec)
    if proc.is_alive():
        try:
            parent.send(None)
        except OSError:
            pass
        proc.join(30)
        if proc.is_alive():
            proc.kill()


def cmd_idle(a):
    meter = Meter([int(p) for p in a.pids.split(",") if p], a.reqlog)
    meter.start()
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        time.sleep(0.1)
        meter.sample()
    rec = dict(system=a.system, run=0, workload="idle", phase="idle", seconds=a.seconds)
    rec.update(meter.stop())
    emit(rec)


def cmd_settle(a):
    """Counts everything from --since-bytes of the log (e.g. the mount) plus the settling."""
    meter = Meter([int(p) for p in a.pids.split(",") if p], a.reqlog)
    meter.start()
    if a.since_bytes is not None:
        meter.pos = a.since_bytes
    cpu0 = meter.cpu0
    s = meter.settle(a.settle_quiet, a.settle_max)
    rec = dict(system=a.system, run=0, workload=a.phase, phase=a.phase, settle_s=s)
    if a.seconds is not None:
        rec["seconds"] = a.seconds
    rec.update(meter.stop())
    if a.pids:
        rec["cpu_s"] = round(meter.cpu() - cpu0, 3)
    emit(rec)


def cmd_pids(a):
    """Daemons are found by an argument equal to one of the paths (or ending in =PATH): the
    mount point, or a cache directory when a daemon rewrites and truncates its command line
    (JuiceFS does)."""
    paths = {os.path.realpath(p) for p in a.paths}
    me = {os.getpid(), os.getppid()}
    out = []
    for e in os.listdir("/proc"):
        if not e.isdigit() or int(e) in me:
            continue
        try:
            with open(f"/proc/{e}/cmdline", "rb") as f:
                args = [x.decode("utf-8", "replace") for x in f.read().split(b"\0") if x]
        except OSError:
            continue
        if not args or os.path.basename(args[0]) in ("bash", "sh", "timeout", "python3"):
            continue
        # A rewritten command line is one string: look at its words too.
        words = args + [w for x in args for w in x.split()]
        if any(w.rstrip("/") in paths or w.split("=", 1)[-1].rstrip("/") in paths for w in words):
            out.append(e)
    print(",".join(sorted(out, key=int)))


# --- report -----------------------------------------------------------------------------------

ROWS = [
    ("write4k", "4 KiB buffered write ({buf} MiB, no fsync)"),
    ("read4k_cold", "4 KiB read, cold kernel cache ({buf} MiB)"),
    ("read4k_warm", "4 KiB read, warm kernel cache ({buf} MiB)"),
    ("seqwrite1m", "1 MiB sequential write + fsync ({seq} MiB)"),
    ("fsync4k", "4 KiB append + fsync (x{fsync})"),
    ("meta_create", "create {meta} empty files"),
    ("meta_stat", "stat {meta} files, cold"),
    ("meta_rename", "rename {meta} files"),
    ("meta_unlink", "unlink {meta} files"),
    ("meta_sum", "metadata: create+stat+rename+unlink"),
    ("untar", "untar {tarball}"),
    ("git", "git init + add -A + commit of it"),
    ("sqlite_normal", "SQLite WAL, synchronous=NORMAL ({sqlite} txns)"),
    ("sqlite_full", "SQLite WAL, synchronous=FULL ({sqlite} txns)"),
]
META_PARTS = ["meta_create", "meta_stat", "meta_rename", "meta_unlink"]
EXTRA_ROWS = [
    ("mount", "mount (+ settling)"),
    ("idle", "idle {idle} s after mount"),
    ("final_sync", "`owfs sync` after the workloads"),
    ("unmount", "unmount"),
]


def fmt_s(x):
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 10:
        return f"{x:.1f} s"
    if x >= 1:
        return f"{x:.2f} s"
    return f"{x * 1000:.0f} ms" if x >= 0.01 else f"{x * 1000:.1f} ms"


def cmd_report(a):
    recs, info, failed, notes = [], {}, {}, []
    with open(a.results) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            kind = r.get("kind")
            if kind == "info":
                info.update(r)
            elif kind == "failed":
                failed.setdefault(r["system"], r["why"])
            elif kind == "note":
                notes.append(r["text"])
            else:
                recs.append(r)
    systems = [s for s in info.get("systems", "").split(",") if s]
    sizes = info.get("sizes", {})

    # per (system, phase): list of records
    by = {}
    for r in recs:
        by.setdefault((r["system"], r["phase"]), []).append(r)
    # the metadata sum, per run
    for s in systems:
        runs = {}
        for p in META_PARTS:
            for r in by.get((s, p), []):
                runs.setdefault(r["run"], []).append(r)
        for run, rs in runs.items():
            rec = dict(system=s, run=run, workload="meta", phase="meta_sum")
            bad = [r for r in rs if "seconds" not in r]
            if bad or len(rs) < len(META_PARTS):
                rec["status"] = (bad[0].get("status") if bad else None) or "skipped"
                rec["limit"] = bad[0].get("limit") if bad else None
            else:
                rec["seconds"] = sum(r["seconds"] for r in rs)
            if all("req" in r for r in rs):
                rec["req"] = {
                    k: sum(r["req"][k] for r in rs) for k in ("PUT", "GET", "LIST", "other")
                }
            if all("cpu_s" in r for r in rs):
                rec["cpu_s"] = sum(r["cpu_s"] for r in rs)
                rec["rss_kib"] = max(r["rss_kib"] for r in rs)
                rec["settle_s"] = sum(r.get("settle_s", 0) for r in rs)
            by.setdefault((s, "meta_sum"), []).append(rec)

    runs = info.get("runs", 1)
    fewer = []

    def med_time(s, p):
        """(median seconds or None, note): note says why there is no number."""
        rs = by.get((s, p), [])
        ok = [r["seconds"] for r in rs if "seconds" in r]
        if ok and not [r for r in rs if "seconds" not in r] and len(ok) < runs and rs[0]["run"] > 0:
            fewer.append((s, p))
        bad = [r for r in rs if "seconds" not in r]
        if bad and ok and all(r.get("status") in ("error", "skipped") for r in bad):
            what = "error" if any(r.get("status") == "error" for r in bad) else "skipped after an error"
            return statistics.median(ok), f" ({what} in {len(bad)} of {len(rs)} runs)"
        if bad:
            b = bad[0]
            st = b.get("status", "error")
            if st == "timeout":
                done = f" ({b['done'][0]:,} of {b['done'][1]:,} done)" if b.get("done") else ""
                return None, f"timeout >{b.get('limit', '?'):.0f}s{done}"
            if st == "error":
                return None, "error"
            return None, st
        if not ok:
            return None, "—"
        return statistics.median(ok), ""

    def med(s, p, key, sub=None):
        vals = []
        for r in by.get((s, p), []):
            v = r.get(key)
            if v is None:
                continue
            vals.append(v[sub] if sub else v)
        return statistics.median(vals) if vals else None

    label_args = dict(
        buf=sizes.get("buf_mib", "?"),
        seq=sizes.get("seq_mib", "?"),
        fsync=sizes.get("fsync_n", "?"),
        meta=f"{sizes.get('meta_n', '?'):,}" if isinstance(sizes.get("meta_n"), int) else "?",
        tarball=sizes.get("tarball", "?"),
        sqlite=f"{sizes.get('sqlite_n', '?'):,}" if isinstance(sizes.get("sqlite_n"), int) else "?",
        idle=sizes.get("idle_s", "?"),
    )
    others = [s for s in systems if s != "native"]
    # owfs before and after a change, side by side: a column comparing them per workload.
    ab = "owfs-base" in others and "owfs" in others and not ({"owfs-base", "owfs"} & set(failed))

    def ab_ratio(key):
        """owfs-base time / owfs time (the median), and the range of the per-run ratios (run r
        of each ran back to back) when there are two runs or more."""
        b, _ = med_time("owfs-base", key)
        t, _ = med_time("owfs", key)
        if not b or not t:
            return "—"
        cell = f"{b / t:.2f}"
        tb = {r["run"]: r["seconds"] for r in by.get(("owfs-base", key), []) if "seconds" in r}
        ta = {r["run"]: r["seconds"] for r in by.get(("owfs", key), []) if "seconds" in r}
        per_run = [tb[r] / ta[r] for r in tb if r in ta and ta[r] > 0]
        if len(per_run) >= 2:
            cell += f" ({min(per_run):.2f}–{max(per_run):.2f})"
        return cell

    out = []
    w = out.append
    w(f"# Mount benchmark ({info.get('date', '')})")
    w("")
    w(
        f"Host: {info.get('host', '?')}. Runs per workload: {info.get('runs', '?')} (medians). "
        f"Store: moto_server on 127.0.0.1, one server and one bucket per system."
    )
    if info.get("versions"):
        w("Versions: " + "; ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".")
    vers = info.get("versions", {})
    if "owfs-base" in systems:
        w("")
        w(
            f"**owfs-base** is owfs before the change ({vers.get('owfs-base', '?')}), **owfs** "
            f"after it ({vers.get('owfs', '?')}): mounted the same way, each on its own store."
        )
    w("")
    w(
        "**Speed relative to native** = native time / system time, measured in the same run: "
        "1.00 = as fast as a plain ext4 directory, 0.90 = 90% of native speed, 0.10 = ten times "
        "slower, above 1 = faster than native. Times are wall-clock medians of the workload "
        "itself (the program's view); uploads a system does later in the background are not "
        "in them (see the second table: settle s)."
    )
    if ab:
        w("")
        w(
            "**owfs vs owfs-base** = owfs-base time / owfs time: above 1 = the change made owfs "
            "faster on that workload, below 1 = slower (with two runs or more, in brackets: the "
            "lowest and highest ratio of one run's pair, a hint of the noise)."
        )
    w("")
    hdr = ["workload", "native"]
    for s in others:
        hdr += [s, f"{s} speed"]
    if ab:
        hdr.append("owfs vs owfs-base")
    w("| " + " | ".join(hdr) + " |")
    w("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
    for key, label in ROWS:
        if not any((s, key) in by for s in systems):
            continue
        nat, nnote = med_time("native", key) if "native" in systems else (None, "—")
        row = [label.format(**label_args), fmt_s(nat) if nat is not None else nnote]
        for s in others:
            if s in failed:
                row += [failed[s], ""]
                continue
            t, note = med_time(s, key)
            if t is None:
                row += [note, ""]
            else:
                mark = "†" if (s, key) in fewer else ""
                row += [fmt_s(t) + mark + note, f"{nat / t:.2f}" if nat and t > 0 else "—"]
        if ab:
            row.append(ab_ratio(key))
        w("| " + " | ".join(row) + " |")
    w("")
    if fewer:
        w(
            f"† fewer than {runs} runs: a workload whose first run took longer than "
            f"{info.get('once_over', '?')} s is not repeated (the median is of the runs made)."
        )
    for s in others:
        if s in failed:
            w(f"- {s}: {failed[s]}")
    for s in failed:
        if s not in others:
            w(f"- {s}: {failed[s]}")
    errs = [r for r in recs if r.get("status") == "error"]
    for r in errs:
        w(f"- {r['system']} {r['phase']} (run {r['run']}): error: {r.get('error', '?')}")
    w(
        "- What an fsync means differs: native and owfs make it durable on local disk (owfs "
        "commits to the store about once a second, and on `owfs sync`); s3fs uploads the whole "
        "file on fsync and close; JuiceFS --writeback and rclone's full cache answer once the "
        "data is in their local cache and upload in the background."
    )
    w("")
    w("## Daemon and store, per workload")
    w("")
    w(
        "Peak RSS and CPU seconds (user+system) of the system's daemon process(es) during the "
        "workload and its settling; store requests counted from moto's request log (PUT "
        "includes multipart parts; LIST = GET on the bucket; other = HEAD, DELETE, POST). "
        "**settle s** = how long after the workload returned the last store request arrived "
        "(background upload lag), waiting until the store was quiet for "
        f"{info.get('quiet', '?')} (capped). Medians over runs."
    )
    w("")
    hdr = ["workload", "system", "time", "settle s", "peak RSS MiB", "CPU s", "PUT", "GET", "LIST", "other"]
    w("| " + " | ".join(hdr) + " |")
    w("|" + "|".join(["---", "---"] + ["---:"] * (len(hdr) - 2)) + "|")
    for key, label in ROWS + EXTRA_ROWS:
        for s in others:
            if (s, key) not in by:
                continue
            t, note = med_time(s, key)
            rss = med(s, key, "rss_kib")
            cpu = med(s, key, "cpu_s")
            settle = med(s, key, "settle_s")
            req = [med(s, key, "req", k) for k in ("PUT", "GET", "LIST", "other")]
            row = [
                label.format(**label_args),
                s,
                fmt_s(t) + note if t is not None else note,
                f"{settle:.1f}" if settle is not None else "—",
                f"{rss / 1024:.0f}" if rss is not None else "—",
                f"{cpu:.2f}" if cpu is not None else "—",
            ] + [f"{v:.0f}" if v is not None else "—" for v in req]
            w("| " + " | ".join(row) + " |")
    w("")
    for n in notes:
        w(f"- {n}")
    write_report(out, a.out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def meter_opts(q):
        q.add_argument("--system", default="native")
        q.add_argument("--pids", default="", help="comma-separated daemon pids")
        q.add_argument("--reqlog", default="", help="moto_server's request log")
        q.add_argument("--settle-quiet", type=float, default=2.0)
        q.add_argument("--settle-max", type=float, default=120.0)

    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("workload", choices=sorted(PHASES))
    meter_opts(r)
    r.add_argument("--run", type=int, default=1)
    r.add_argument("--timeout", type=float, default=180.0, help="per phase, seconds")
    r.add_argument("--buf-mib", type=int, default=64)
    r.add_argument("--seq-mib", type=int, default=256)
    r.add_argument("--fsync-n", type=int, default=500)
    r.add_argument("--meta-n", type=int, default=10000)
    r.add_argument("--sqlite-n", type=int, default=2000)
    r.add_argument("--tarball", default="")
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("idle")
    i.add_argument("seconds", type=float)
    meter_opts(i)
    i.set_defaults(fn=cmd_idle)

    st = sub.add_parser("settle")
    meter_opts(st)
    st.add_argument("--phase", required=True)
    st.add_argument("--since-bytes", type=int)
    st.add_argument("--seconds", type=float)
    st.set_defaults(fn=cmd_settle)

    q = sub.add_parser("pids")
    q.add_argument("paths", nargs="+", metavar="PATH")
    q.set_defaults(fn=cmd_pids)

    add_store_commands(sub)

    q = sub.add_parser("report")
    q.add_argument("results")
    q.add_argument("--out")
    q.set_defaults(fn=cmd_report)

    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
