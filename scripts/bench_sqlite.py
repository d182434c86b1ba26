#!/usr/bin/env python3
"""The SQLite replication benchmark's helper (scripts/bench-sqlite.sh runs it; see its --help).

Subcommands:
  moto [-H HOST] -p PORT --body-log FILE   moto's S3 server (its own request log on stderr, as
                               moto_server writes it), wrapped so that every request is also
                               written to FILE as one JSON line: start and end times, method,
                               path, status, the bytes of its body, the access key that signed
                               it, and for an LTX file (Litestream) the fields of its header
  init DB...                   create the benchmark's table and index in each DB (WAL mode)
  run [options]                the workload on both databases and every measurement; JSONL out
  report JSONL [--out FILE]    the Markdown report of a run's JSONL
  mkbucket ENDPOINT NAME       create a bucket on a moto server

Only the standard library (and moto, for `moto`).
"""

import argparse
import bisect
import json
import os
import random
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import MOTO_REQUEST, add_store_commands, write_report  # noqa: E402

# Requests signed with this access key are the benchmark's own (restores, `owfs ls`): they are
# kept apart from what the replicating system spends.
PROBE_KEY = "probe"
MIB = 1 << 20


# --- moto with a body-counting request log ---------------------------------------------------


class CountingInput:
    """wsgi.input that counts the bytes read and keeps the first few hundred."""

    def __init__(self, inner):
        self.inner = inner
        self.n = 0
        self.head = b""

    def _seen(self, b):
        self.n += len(b)
        if len(self.head) < 512:
            self.head += b[: 512 - len(self.head)]
        return b

    def read(self, *a):
        return self._seen(self.inner.read(*a))

    def readline(self, *a):
        return self._seen(self.inner.readline(*a))

    def readlines(self, *a):
        return [self._seen(x) for x in self.inner.readlines(*a)]

    def __iter__(self):
        for x in self.inner:
            yield self._seen(x)


def ltx_header(head):
    """The fields of an LTX file's header (Litestream's format: big-endian, 100 bytes) at the
    start of a body, after an aws-chunked chunk line if there is one; None if it is not one."""
    m = re.match(rb"[0-9a-fA-F]+(;[^\r\n]*)?\r\n", head)
    if m and head[m.end() : m.end() + 4] == b"LTX1":
        head = head[m.end() :]
    if len(head) < 100 or head[:4] != b"LTX1":
        return None
    flags, page_size, commit, min_tx, max_tx, ts = struct.unpack(">IIIQQq", head[4:40])
    wal_off, wal_size = struct.unpack(">qq", head[48:64])
    return {"min": min_tx, "max": max_tx, "ts_ms": ts, "commit": commit, "page_size": page_size,
            "wal_off": wal_off, "wal_size": wal_size}


class BodyLog:
    """WSGI middleware: one JSON line per request, written when its answer has been sent."""

    def __init__(self, app, path):
        self.app = app
        self.f = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        t0 = time.time()
        inp = CountingInput(environ["wsgi.input"])
        environ["wsgi.input"] = inp
        status = []

        def sr(st, headers, exc_info=None):
            status.append(st)
            return start_response(st, headers, exc_info)

        auth = environ.get("HTTP_AUTHORIZATION", "")
        m = re.search(r"Credential=([^/,\s]+)", auth)
        rec = {"t0": round(t0, 4), "m": environ.get("REQUEST_METHOD", ""),
               "p": environ.get("PATH_INFO", ""), "q": environ.get("QUERY_STRING", ""),
               "key": m.group(1) if m else ""}
        try:
            body = self.app(environ, sr)
        except Exception:
            rec.update(t1=round(time.time(), 4), st=500, n=inp.n)
            self.write(rec)
            raise
        return Closing(body, lambda: self.finish(rec, environ, inp, status))

    def finish(self, rec, environ, inp, status):
        decoded = environ.get("HTTP_X_AMZ_DECODED_CONTENT_LENGTH")
        n = int(decoded) if decoded and decoded.isdigit() else inp.n
        rec.update(t1=round(time.time(), 4), st=int(status[0].split()[0]) if status else 0, n=n)
        if rec["m"] == "PUT" and rec["p"].endswith(".ltx"):
            h = ltx_header(inp.head)
            if h:
                rec["ltx"] = h
        self.write(rec)

    def write(self, rec):
        with self.lock:
            self.f.write(json.dumps(rec) + "\n")


class Closing:
    """A WSGI answer's iterable whose close() also calls `done` (the answer has been sent)."""

    def __init__(self, inner, done):
        self.inner = inner
        self.done = done

    def __iter__(self):
        return iter(self.inner)

    def close(self):
        try:
            if hasattr(self.inner, "close"):
                self.inner.close()
        finally:
            self.done()


def cmd_moto(a):
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    os.environ.setdefault("MOTO_PORT", str(a.port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(a.host, a.port, BodyLog(app, a.body_log), threaded=True)


# --- reading the logs --------------------------------------------------------------------------


def kind_of(m, path, query):
    """PUT, GET, LIST, DELETE or other, as the report counts requests."""
    path = path.strip("/")
    if m == "PUT":
        return "PUT"
    if m == "GET":
        return "LIST" if "/" not in path else "GET"
    if m == "DELETE" or (m == "POST" and re.search(r"(^|&)delete(=|&|$)", query)):
        return "DELETE"
    return "other"  # HEAD, multipart create/complete


def read_log(path):
    out = []
    try:
        with open(path) as f:
            for line in f:
                if line.endswith("\n"):
                    out.append(json.loads(line))
    except FileNotFoundError:
        pass
    return out


def tally(recs):
    """Requests by kind and PUT body bytes of a system's own requests (not the probes')."""
    c = {"PUT": 0, "GET": 0, "LIST": 0, "DELETE": 0, "other": 0}
    up = 0
    for r in recs:
        c[kind_of(r["m"], r["p"], r["q"])] += 1
        if r["m"] == "PUT":
            up += r.get("n", 0)
    return {"req": c, "requests": sum(c.values()), "put_bytes": up}


def moto_log_count(path):
    """Requests in moto's own (werkzeug) log, all of it (it has whole seconds only): a
    cross-check of the body log's count."""
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if MOTO_REQUEST.search(line.decode("utf-8", "replace")):
                n += 1
    return n


class Store:
    """One system's moto body log, read incrementally."""

    def __init__(self, path, quiet_ignore=None, polls=False, settled=None):
        self.path = path
        self.quiet_ignore = re.compile(quiet_ignore) if quiet_ignore else None
        self.polls = polls
        self.settled = settled  # recs -> bool: the system's own work is done (besides quiet)

    def recs(self):
        return read_log(self.path)

    def last_work(self):
        """End time of the latest request of the system that counts as work (not the probes',
        not the ones that run on a timer whatever happens: owfs' lease renewal, Litestream's
        LISTs of its levels every 15 s for the L0 retention check)."""
        last = 0.0
        for r in self.recs():
            if r.get("key") == PROBE_KEY:
                continue
            if self.quiet_ignore and self.quiet_ignore.search(r["p"]):
                continue
            if self.polls and kind_of(r["m"], r["p"], r["q"]) == "LIST":
                continue
            last = max(last, r["t1"])
        return last


def wait_quiet(stores, quiets, limit, say):
    """Waits until every store has had no work request for its quiet time (at most `limit` s
    in all). Returns {name: time it went quiet (its last work + quiet), or None on timeout}."""
    t0 = time.time()
    done = {}
    while True:
        now = time.time()
        for name, st in stores.items():
            if name in done:
                continue
            since = max(st.last_work(), t0)
            if now - since >= quiets[name] and (st.settled is None or st.settled(st.recs())):
                done[name] = since + quiets[name]
        if len(done) == len(stores):
            return done
        if now - t0 >= limit:
            for name in stores:
                if name not in done:
                    say(f"{name}: not quiet after {limit:.0f} s; going on")
                    done[name] = None
            return done
        time.sleep(1.0)


# --- the workload --------------------------------------------------------------------------------


def connect(path):
    c = sqlite3.connect(path, isolation_level=None, timeout=60)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    return c


def cmd_init(a):
    for p in a.db:
        c = connect(p)
        c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, "
                  "seq INTEGER NOT NULL, ts REAL NOT NULL, v TEXT NOT NULL)")
        c.execute("CREATE INDEX IF NOT EXISTS t_k ON t(k)")
        c.close()


def value(rng):
    # 272 hex characters: with the other columns a row of about 300 bytes, compressible about
    # 2:1 (as text data often is; neither system gets incompressible or trivially compressible
    # pages).
    return rng.randbytes(136).hex()


def db_bytes(c):
    return c.execute("PRAGMA page_count").fetchone()[0] * c.execute("PRAGMA page_size").fetchone()[0]


def build(path, size, seed, out):
    """Fills the database to `size` bytes in transactions of 5,000 rows (seq 0)."""
    c = connect(path)
    rng = random.Random(seed)
    t0 = time.time()
    rows = 0
    while db_bytes(c) < size:
        now = time.time()
        c.execute("BEGIN")
        c.executemany("INSERT INTO t(k, seq, ts, v) VALUES (?, 0, ?, ?)",
                      [(rng.getrandbits(62), now, value(rng)) for _ in range(5000)])
        c.execute("COMMIT")
        rows += 5000
    end = time.time()
    out.update(rows=c.execute("SELECT count(*) FROM t").fetchone()[0], seconds=round(end - t0, 2),
               db_bytes=db_bytes(c), end=end)
    c.close()


class WalFrames:
    """Follows a database's WAL as its transactions commit: after each, (salt-1, salt-2, number
    of the last commit frame) of the log cycle, as SQLite's recovery would count it. With the
    newest transaction of each, it says which transaction a generation holds from the WAL state
    its record names (owfs log --json), without reading the generation back."""

    def __init__(self, path):
        self.path, self.salts, self.frames, self.off, self.last = path + "-wal", None, 0, 32, 0

    def after_commit(self):
        with open(self.path, "rb") as f:
            hdr = f.read(32)
            if len(hdr) < 32:
                return None
            page = int.from_bytes(hdr[8:12], "big")
            salts = (int.from_bytes(hdr[16:20], "big"), int.from_bytes(hdr[20:24], "big"))
            if salts != self.salts:
                self.salts, self.frames, self.off, self.last = salts, 0, 32, 0
            while True:
                f.seek(self.off)
                fh = f.read(24)
                if len(fh) < 24 or (int.from_bytes(fh[8:12], "big"),
                                    int.from_bytes(fh[12:16], "big")) != salts:
                    break
                self.frames += 1
                self.off += 24 + page
                if int.from_bytes(fh[4:8], "big") != 0:
                    self.last = self.frames
        return (salts[0], salts[1], self.last)


def steady(path, n, rate, seed, t_start, nrows, log, wal_states=None):
    """n one-row transactions at `rate` a second from t_start: 70% update a random row's value,
    30% insert a row. Each sets seq (1..n) and ts: what a restored database holds says which
    transaction is the newest in it. Appends (seq, start, end) to log; with `wal_states` (a
    dict), maps the WAL state after each commit (WalFrames) to its seq."""
    c = connect(path)
    wal = WalFrames(path) if wal_states is not None else None
    rng = random.Random(seed)
    for i in range(1, n + 1):
        due = t_start + (i - 1) / rate
        d = due - time.time()
        if d > 0:
            time.sleep(d)
        upd = rng.random() < 0.7
        row = rng.randrange(1, nrows + 1)
        k, v = rng.getrandbits(62), value(rng)
        s = time.time()
        c.execute("BEGIN")
        if upd:
            c.execute("UPDATE t SET v = ?, seq = ?, ts = ? WHERE id = ?", (v, i, s, row))
        else:
            c.execute("INSERT INTO t(k, seq, ts, v) VALUES (?, ?, ?, ?)", (k, i, s, v))
            nrows += 1
        c.execute("COMMIT")
        log.append((i, s, time.time()))
        if wal is not None:
            st = wal.after_commit()
            if st is not None:
                wal_states[st] = i
    c.close()


def bulk(path, nbytes, seq, seed, out):
    """One transaction inserting `nbytes` of ~300-byte rows (seq = `seq`)."""
    c = connect(path)
    rng = random.Random(seed)
    n = nbytes // 300
    t0 = time.time()
    c.execute("BEGIN")
    c.executemany("INSERT INTO t(k, seq, ts, v) VALUES (?, ?, ?, ?)",
                  ((rng.getrandbits(62), seq, t0, value(rng)) for _ in range(n)))
    c.execute("COMMIT")
    t1 = time.time()
    out.update(rows=n, start=t0, end=t1, seconds=round(t1 - t0, 2))
    c.close()


def both(fn, args_by_sys):
    """Runs fn(*args) for each system at once, one thread each; re-raises a thread's error."""
    errs = {}

    def run(name, args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported with the system's name
            errs[name] = e

    ts = [threading.Thread(target=run, args=(k, v)) for k, v in args_by_sys.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errs:
        raise RuntimeError("; ".join(f"{k}: {v!r}" for k, v in errs.items()))


def newest(path):
    """(rows, max seq) of a database file, opened read-write so that its WAL is recovered."""
    c = sqlite3.connect(path)
    r = c.execute("SELECT count(*), max(seq) FROM t").fetchone()
    ok = c.execute("PRAGMA quick_check").fetchone()[0]
    c.close()
    return r[0], r[1], ok


# --- durable states ------------------------------------------------------------------------------


GEN_PATH = re.compile(r"/ws/[^/]+/gens/(\d{20})$")
LTX_PATH = re.compile(r"/(\d{4})/([0-9a-f]{16})-([0-9a-f]{16})\.ltx$")


def owfs_publishes(recs):
    """(publish end time, generation number) of every generation record created (HTTP 200)."""
    out = []
    for r in recs:
        m = GEN_PATH.search(r["p"])
        if m and r["m"] == "PUT" and r["st"] == 200:
            out.append((r["t1"], int(m.group(1))))
    return sorted(out)


def ltx_uploads(recs):
    """(upload end time, level, min txid, max txid, header timestamp s) of every LTX file: a
    single PUT, or a multipart upload (header in part 1, done when it is completed)."""
    out = []
    parts = {}
    for r in sorted(recs, key=lambda r: r["t1"]):
        m = LTX_PATH.search(r["p"])
        if not m or r["st"] != 200:
            continue
        up = re.search(r"uploadId=([^&]+)", r["q"])
        if r["m"] == "PUT" and up and "ltx" in r:
            parts[up.group(1)] = r["ltx"]
            continue
        h = r.get("ltx") if r["m"] == "PUT" and not up else None
        if r["m"] == "POST" and up:
            h = parts.pop(up.group(1), None)
        if h:
            out.append((r["t1"], int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16),
                        h["ts_ms"] / 1000.0))
    return sorted(out)


def ltx_compacted(recs):
    """Litestream has compacted every L0 file it uploaded into L1 and L2 (the levels that fire
    within minutes: 30 s and 5 min by default). Waiting for this before a phase ends puts the
    compactions a phase causes in that phase, not in the next one."""
    top = {}
    for _t, lv, _lo, hi, _ts in ltx_uploads(recs):
        top[lv] = max(top.get(lv, 0), hi)
    return 0 in top and top.get(1, 0) >= top[0] and top.get(2, 0) >= top[0]


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round((len(xs) - 1) * p)))]


def seq_by_time(log, t):
    """The newest transaction whose commit had returned by time t (0: none of the phase's)."""
    i = bisect.bisect_right([e for _, _, e in log], t) - 1
    return log[i][0] if i >= 0 else 0


def recovery_points(samples_at, durable, log):
    """For each sample time s: the newest transaction held by a state whose upload had ended by
    s, `age`: how old its commit is at s (None while that is still the build's state), and
    `loss`: how long the first transaction not in it has been committed at s (0 if none has:
    the durable state is the current one), which is what a crash at s would lose. `durable`:
    sorted (upload end, newest seq in that state). `log`: (seq, start, end), in order."""
    ends = {seq: e for seq, _, e in log}
    out = []
    j = -1
    best = None
    for s in samples_at:
        while j + 1 < len(durable) and durable[j + 1][0] <= s:
            j += 1
            best = durable[j][1] if best is None else max(best, durable[j][1])
        k = best or 0
        nxt = ends.get(k + 1)
        out.append({"s": round(s, 3), "seq": k,
                    "age": round(s - ends[k], 3) if k in ends else None,
                    "loss": round(s - nxt, 3) if nxt is not None and nxt <= s else 0.0})
    return out


def wal_committed_pages(buf):
    """The page images of a WAL's valid frames up to its last valid commit frame, as SQLite's
    recovery reads it (sqlite.org fileformat2 §4: salts equal the header's and the cumulative
    checksum, over 32-bit words in the byte order the magic says, matches). [] if none."""
    if len(buf) < 32:
        return []
    magic, _ver, psz, _ckpt, salt1, salt2, c1, c2 = struct.unpack(">8I", buf[:32])
    if magic not in (0x377F0682, 0x377F0683) or psz < 512:
        return []
    fmt = ">" if magic & 1 else "<"

    def cksum(b, s0, s1):
        w = struct.unpack(f"{fmt}{len(b) // 4}I", b)
        for i in range(0, len(w), 2):
            s0 = (s0 + w[i] + s1) & 0xFFFFFFFF
            s1 = (s1 + w[i + 1] + s0) & 0xFFFFFFFF
        return s0, s1

    s0, s1 = cksum(buf[:24], 0, 0)
    if (s0, s1) != (c1, c2):
        return []
    pages, committed, off = [], 0, 32
    while off + 24 + psz <= len(buf):
        _pgno, dbsize, f1, f2, k1, k2 = struct.unpack(">6I", buf[off : off + 24])
        if (f1, f2) != (salt1, salt2):
            break
        s0, s1 = cksum(buf[off : off + 8], s0, s1)
        s0, s1 = cksum(buf[off + 24 : off + 24 + psz], s0, s1)
        if (s0, s1) != (k1, k2):
            break
        pages.append(buf[off + 24 : off + 24 + psz])
        if dbsize:
            committed = len(pages)
        off += 24 + psz
    return pages[:committed]


def varint(b, i):
    v = 0
    for k in range(9):
        c = b[i + k]
        if k == 8:
            return (v << 8) | c, i + 9
        v = (v << 7) | (c & 0x7F)
        if c < 0x80:
            return v, i + k + 1
    return v, i + 9


INT_LEN = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def max_seq_in_pages(pages):
    """The largest `seq` (third column of table t: id, k, seq, ts, v) in the table b-tree leaf
    pages among `pages`; index and interior pages are skipped, and so is a page whose cells do
    not decode as rows of t."""
    top = None
    for pg in pages:
        if pg[0] != 0x0D:
            continue
        n = int.from_bytes(pg[3:5], "big")
        for c in range(n):
            try:
                p = int.from_bytes(pg[8 + 2 * c : 10 + 2 * c], "big")
                _plen, p = varint(pg, p)
                _rowid, p = varint(pg, p)
                hlen, q = varint(pg, p)
                body = p + hlen
                types = []
                while q < p + hlen:
                    t, q = varint(pg, q)
                    types.append(t)
                if len(types) != 5 or types[0] != 0 or types[3] != 7:
                    continue
                off = body + INT_LEN.get(types[1], 0)
                t2 = types[2]
                if t2 in (8, 9):
                    v = t2 - 8
                elif t2 in INT_LEN:
                    v = int.from_bytes(pg[off : off + INT_LEN[t2]], "big", signed=True)
                else:
                    continue
                top = v if top is None else max(top, v)
            except IndexError:
                continue
    return top


class Owfs:
    def __init__(self, a):
        self.bin = a.owfs_bin
        self.store = a.owfs_store
        self.ws = a.owfs_ws
        self.env = dict(os.environ, AWS_ENDPOINT_URL=a.owfs_endpoint, AWS_ALLOW_HTTP="true",
                        AWS_ACCESS_KEY_ID=PROBE_KEY, AWS_SECRET_ACCESS_KEY=PROBE_KEY)

    def owfs(self, *args, json_out=True):
        cmd = [self.bin, "--store", self.store, "-q"] + (["--json"] if json_out else []) + list(args)
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
        return json.loads(r.stdout) if json_out else r.stdout

    def newest_seq(self, n):
        """The newest transaction generation n holds, read from its app.db-wal: the largest seq
        in the pages of the WAL's committed frames, as SQLite would recover it from that
        generation (None if the WAL holds no committed frame of this log cycle, which happens
        only between a checkpoint and the next write)."""
        cmd = [self.bin, "--store", self.store, "-q", "cat", f"{self.ws}@{n}", "app.db-wal"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, timeout=600)
        if r.returncode != 0:
            # No WAL in that generation (the last connection had closed): nothing to read.
            print(f"bench-sqlite: note: {' '.join(cmd[-2:])}: exit {r.returncode}", file=sys.stderr)
            return None
        return max_seq_in_pages(wal_committed_pages(r.stdout))

    def restore(self, dest, gen=None):
        spec = self.ws if gen is None else f"{self.ws}@{gen}"
        self.owfs("restore", spec, dest, json_out=False)
        return os.path.join(dest, "app.db")


class Litestream:
    def __init__(self, a):
        self.bin = a.litestream_bin
        self.probe_config = a.ls_probe_config
        self.db = a.ls_db

    def restore(self, dest, txid=None):
        out = os.path.join(dest, "app.db")
        os.makedirs(dest, exist_ok=True)
        cmd = [self.bin, "restore", "-config", self.probe_config, "-o", out]
        if txid is not None:
            cmd += ["-txid", f"{txid:016x}"]
        cmd.append(self.db)
        env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}  # see bench-sqlite.sh
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
        return out


def timed_restore(fn, dest, *args):
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    t0 = time.time()
    db = fn(dest, *args)
    t1 = time.time()
    rows, top, ok = newest(db)
    return {"seconds": round(t1 - t0, 2), "rows": rows, "max_seq": top, "quick_check": ok,
            "t0": t0, "t1": t1}


def cmd_run(a):
    def say(msg):
        print(f"[{time.strftime('%H:%M:%S')}] bench-sqlite: {msg}", file=sys.stderr, flush=True)

    out = open(a.out, "a", buffering=1)

    def emit(rec):
        out.write(json.dumps(rec) + "\n")

    names = ("owfs", "litestream")
    dbs = {"owfs": a.owfs_db, "litestream": a.ls_db}
    stores = {"owfs": Store(a.owfs_body_log, quiet_ignore=r"/ws/[^/]+/lease$"),
              "litestream": Store(a.ls_body_log, polls=True, settled=ltx_compacted)}
    quiets = {"owfs": a.owfs_quiet, "litestream": a.ls_quiet}
    ow, ls = Owfs(a), Litestream(a)

    # 1. Build.
    say(f"building {a.size / MIB:.0f} MiB databases on both")
    built = {n: {} for n in names}
    both(build, {n: (dbs[n], a.size, a.seed, built[n]) for n in names})
    for n in names:
        emit({"kind": "build", "system": n, **{k: v for k, v in built[n].items() if k != "end"}})
    say(f"built: {built['owfs']['rows']} rows, {built['owfs']['db_bytes'] / MIB:.0f} MiB "
        f"in {built['owfs']['seconds']} s (owfs) / {built['litestream']['seconds']} s (litestream)")
    say("waiting until both stores are quiet")
    q = wait_quiet(stores, quiets, a.settle_max, say)
    emit({"kind": "settle", "phase": "build", "quiet_at": q})

    # 2. Steady updates and inserts.
    n_tx = int(a.duration * a.rate)
    reset = time.time()
    t_start = reset + 1.0
    say(f"steady: {n_tx} transactions at {a.rate}/s on both ({a.duration} s)")
    logs = {n: [] for n in names}
    nrows = built["owfs"]["rows"]
    wal_states = {}
    both(steady, {n: (dbs[n], n_tx, a.rate, a.seed + 1, t_start, nrows, logs[n],
                      wal_states if n == "owfs" else None) for n in names})
    steady_end = time.time()
    for n in names:
        lat = [e - s for _, s, e in logs[n]]
        late = [s - (t_start + (i - 1) / a.rate) for i, s, _ in logs[n]]
        emit({"kind": "steady", "system": n, "transactions": len(logs[n]),
              "seconds": round(logs[n][-1][2] - t_start, 2),
              "commit_ms_p50": round(pct(lat, 0.5) * 1000, 2),
              "commit_ms_p99": round(pct(lat, 0.99) * 1000, 2),
              "late_s_max": round(max(late), 3)})
    with open(a.out + ".txlog", "w") as f:
        json.dump({n: logs[n] for n in names}, f)

    # 3. Recovery points, ten samples a second of the steady phase (a sample once a second would
    # fall at one phase of both systems' own 1 s cycles and say more about that phase than
    # about the system), from what had been uploaded by then (the store's log says when each
    # upload ended).
    say("recovery points")
    samples_at = [t_start + k / 10 for k in range(10, int(a.duration * 10) + 1)]
    t_rp = time.time()
    rp = {}
    pubs = owfs_publishes(stores["owfs"].recs())
    # Only the generations that are the newest at some sample need reading.
    need = set()
    pub_ends = [t for t, _ in pubs]
    for s in samples_at:
        i = bisect.bisect_right(pub_ends, s) - 1
        if i >= 0:
            need.add(pubs[i][1])
    # Each generation's WAL state as its record names it (one `owfs log --json`), mapped to the
    # transaction that ended there by what the workload saw of its own WAL after each commit;
    # a state the workload never saw (none should be) is read back with `owfs cat`, and a few
    # mapped ones are too, as a check of the mapping.
    recorded = {}
    for g in ow.owfs("log", ow.ws):
        w = (g.get("sqlite") or {}).get("app.db", {}).get("wal")
        if w:
            recorded[g["number"]] = (w["salt1"], w["salt2"], w["last_commit"])
    durable_owfs, unknown, read_back, mismatches = [], 0, 0, []
    checks = set(random.Random(a.seed).sample(sorted(need), min(5, len(need))))
    for t, g in pubs:
        if g in need:
            seq = wal_states.get(recorded.get(g))
            if seq is None or g in checks:
                read = ow.newest_seq(g)
                read_back += 1
                if seq is not None and read != seq:
                    mismatches.append((g, seq, read))
                seq = read
            if seq is None:
                unknown += 1  # the state holds at least what the previous one did
            else:
                durable_owfs.append((t, seq))
    if mismatches:
        emit({"kind": "note", "text": f"owfs: recorded WAL state and the generation's own WAL "
              f"disagree (generation, mapped seq, read seq): {mismatches}"})
    rp["owfs"] = recovery_points(samples_at, durable_owfs, logs["owfs"])
    ups = ltx_uploads(stores["litestream"].recs())
    rp["litestream"] = recovery_points(
        samples_at, [(u[0], seq_by_time(logs["litestream"], u[4])) for u in ups], logs["litestream"])
    say(f"recovery points: {len(need)} generations placed in {time.time() - t_rp:.0f} s, "
        f"{read_back} read back with owfs cat ({unknown} without a committed frame, "
        f"{len(mismatches)} mismatches)")
    emit({"kind": "note", "text": f"owfs: {len(need)} generations were the newest at some sample; "
          f"{unknown} of them had no committed frame in their WAL (or no WAL; counted as holding what "
          "the one before held)."})
    for n in names:
        loss = [x["loss"] for x in rp[n]]
        ages = [x["age"] for x in rp[n] if x["age"] is not None]
        emit({"kind": "rpo", "system": n, "samples": len(loss),
              "p50_s": pct(loss, 0.5), "p99_s": pct(loss, 0.99), "max_s": max(loss),
              "age_samples": len(ages), "age_p50_s": pct(ages, 0.5), "age_p99_s": pct(ages, 0.99),
              "age_max_s": max(ages) if ages else None})
    with open(a.out + ".rpo", "w") as f:
        json.dump(rp, f)

    # 4. Check the recovery point measure at a few samples, drawn at random from the last 200 s
    # of the phase (Litestream keeps its L0 files, which a restore to one transaction needs, for
    # 5 minutes): restore the state the measure names and read the newest transaction it holds.
    rng = random.Random(a.seed + 3)
    lo = max(0, len(samples_at) - 2000)
    picks = sorted(rng.sample(range(lo, len(samples_at)), min(a.checks, len(samples_at) - lo)))
    for i in picks:
        s = samples_at[i]
        say(f"checking the recovery point at {s - t_start:.1f} s by restoring that state")
        for n in names:
            try:
                if n == "owfs":
                    g = max((gg for t, gg in pubs if t <= s), default=None)
                    r = timed_restore(ow.restore, os.path.join(a.workdir, "check-owfs"), g)
                    state = f"{a.owfs_ws}@{g}"
                else:
                    best = max((u for u in ups if u[0] <= s), key=lambda u: (u[4], u[3]))
                    r = timed_restore(ls.restore, os.path.join(a.workdir, "check-litestream"), best[3])
                    state = f"txid {best[3]:x} (L{best[1]})"
                c = {"sample_s": round(s - t_start, 1), "state": state, "predicted_seq": rp[n][i]["seq"],
                     "restored_seq": r["max_seq"], "quick_check": r["quick_check"]}
            except Exception as e:  # noqa: BLE001 - reported
                c = {"sample_s": round(s - t_start, 1), "error": str(e)}
            emit({"kind": "rpo_check", "system": n, **c})
            say(f"{n}: recovery point check: {c}")
    for n in names:
        shutil.rmtree(os.path.join(a.workdir, f"check-{n}"), ignore_errors=True)

    say("waiting until both stores are quiet")
    q = wait_quiet(stores, quiets, a.settle_max, say)
    emit({"kind": "settle", "phase": "steady", "quiet_at": q})
    steady_quiet = q

    # 5. Bulk insert.
    bulk_start = time.time()
    say(f"bulk insert of {a.bulk / MIB:.0f} MiB in one transaction on both")
    bo = {n: {} for n in names}
    both(bulk, {n: (dbs[n], a.bulk, n_tx + 1, a.seed + 2, bo[n]) for n in names})
    for n in names:
        emit({"kind": "bulk", "system": n, "rows": bo[n]["rows"], "seconds": bo[n]["seconds"]})
    say("waiting until both stores are quiet")
    q = wait_quiet(stores, quiets, a.settle_max, say)
    emit({"kind": "settle", "phase": "bulk", "quiet_at": q})
    end = time.time()

    # 6. What each system spent, by phase.
    for n in names:
        recs = [r for r in stores[n].recs() if r.get("key") != PROBE_KEY]
        sq = steady_quiet[n] or bulk_start
        bq = q[n] or end
        phases = {"steady": (reset, sq), "between": (sq, bulk_start), "bulk": (bulk_start, bq)}
        for ph, (lo, hi) in phases.items():
            t = tally([r for r in recs if lo <= r["t1"] < hi])
            rec = {"kind": "cost", "system": n, "phase": ph, "seconds": round(hi - lo, 1), **t}
            if n == "litestream":
                lv = {}
                for u in ltx_uploads([r for r in recs if lo <= r["t1"] < hi]):
                    lv.setdefault(u[1], [0, 0])[0] += 1
                for r in recs:
                    m = LTX_PATH.search(r["p"])
                    if m and r["m"] == "PUT" and lo <= r["t1"] < hi:
                        lv.setdefault(int(m.group(1)), [0, 0])[1] += r.get("n", 0)
                rec["ltx_levels"] = {str(k): {"files": v[0], "bytes": v[1]} for k, v in sorted(lv.items())}
            if ph == "steady":
                rec["transactions"] = n_tx
            elif ph == "bulk":
                rec["transactions"] = 1
            emit(rec)

    # 7. Restore the newest state into a fresh directory, timed.
    say("restoring the newest state of each")
    want = n_tx + 1
    for n, fn in (("owfs", ow.restore), ("litestream", ls.restore)):
        try:
            r = timed_restore(fn, os.path.join(a.workdir, f"restore-{n}"))
            src = newest(dbs[n])
            probe = tally([x for x in stores[n].recs() if x.get("key") == PROBE_KEY and r["t0"] <= x["t0"] <= r["t1"]])
            emit({"kind": "restore", "system": n, "seconds": r["seconds"], "rows": r["rows"],
                  "max_seq": r["max_seq"], "quick_check": r["quick_check"], "source_rows": src[0],
                  "ok": r["rows"] == src[0] and r["max_seq"] == want and r["quick_check"] == "ok",
                  "req": probe["req"]})
            say(f"{n}: restored in {r['seconds']} s: {r['rows']} rows (source {src[0]}), newest seq "
                f"{r['max_seq']} (want {want}), {r['quick_check']}")
        except Exception as e:  # noqa: BLE001 - reported
            emit({"kind": "restore", "system": n, "error": str(e)})
            say(f"{n}: restore failed: {e}")
        shutil.rmtree(os.path.join(a.workdir, f"restore-{n}"), ignore_errors=True)
    for n in names:
        recs = stores[n].recs()
        emit({"kind": "logcheck", "system": n, "body_log": len(recs),
              "moto_log": moto_log_count(a.owfs_moto_log if n == "owfs" else a.ls_moto_log)})
    say("done")


# --- report --------------------------------------------------------------------------------------


def human(n):
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n:.0f} B"


def cmd_report(a):
    recs = [json.loads(line) for line in open(a.jsonl) if line.strip()]
    by = {}
    for r in recs:
        by.setdefault(r["kind"], []).append(r)

    def one(kind, system, **kw):
        for r in by.get(kind, []):
            if r.get("system") == system and all(r.get(k) == v for k, v in kw.items()):
                return r
        return {}

    info = (by.get("info") or [{}])[0]
    names = ("owfs", "litestream")
    L = [f"# SQLite replication: owfs against Litestream ({info.get('date', '?')}, {info.get('label', '')})", ""]
    L.append(f"Workload: a {info.get('size_mib', '?')} MiB database (rows of ~300 bytes, one index), "
             f"{info.get('duration', '?')} s of one-row transactions at {info.get('rate', '?')}/s "
             "(70% update a random row, 30% insert), then one transaction inserting "
             f"{info.get('bulk_mib', '?')} MiB. WAL mode, synchronous=NORMAL, SQLite's default "
             "autocheckpoint; Python's sqlite3, one thread per system, both at once.")
    L.append("")
    L.append(f"owfs: `{info.get('owfs_version', '?')}` ({info.get('owfs_bin', '?')}), database on the mount. "
             f"Litestream: {info.get('litestream_version', '?')}, database on local disk, default settings. "
             f"Each against its own moto_server {info.get('moto_version', '')} on loopback. Host: {info.get('host', '?')}.")
    L.append("")
    L.append("| | owfs | Litestream |")
    L.append("|---|---:|---:|")

    def row(label, f):
        L.append(f"| {label} | " + " | ".join(f(n) for n in names) + " |")

    def cost(n, ph):
        return one("cost", n, phase=ph)

    for ph, title in (("steady", "steady"), ("bulk", "bulk")):
        row(f"{title}: transactions", lambda n, ph=ph: str(cost(n, ph).get("transactions", "?")))
        row(f"{title}: bytes uploaded (PUT bodies)", lambda n, ph=ph: human(cost(n, ph).get("put_bytes", 0)))
        row(f"{title}: requests PUT / GET / LIST / DELETE / other",
            lambda n, ph=ph: " / ".join(str(cost(n, ph).get("req", {}).get(k, 0))
                                        for k in ("PUT", "GET", "LIST", "DELETE", "other")))
        row(f"{title}: requests in all", lambda n, ph=ph: str(cost(n, ph).get("requests", 0)))
        if ph == "steady":
            row("steady: bytes per transaction",
                lambda n: human(cost(n, "steady").get("put_bytes", 0) / max(1, cost(n, "steady").get("transactions", 1))))
            row("steady: requests per transaction",
                lambda n: f"{cost(n, 'steady').get('requests', 0) / max(1, cost(n, 'steady').get('transactions', 1)):.2f}")
            row("steady: window counted (s)", lambda n: str(cost(n, "steady").get("seconds", "?")))
        else:
            row("bulk: insert took (s)", lambda n: str(one("bulk", n).get("seconds", "?")))
            row("bulk: window counted (s)", lambda n: str(cost(n, "bulk").get("seconds", "?")))
    row("requests between the phases (idle)", lambda n: str(cost(n, "between").get("requests", 0)))
    def three(n, keys):
        r = one("rpo", n)
        return " / ".join(f"{r[k]:.2f}" if r.get(k) is not None else "?" for k in keys)

    row("recovery point: loss window p50 / p99 / max (s)", lambda n: three(n, ("p50_s", "p99_s", "max_s")))
    row("recovery point: age of the newest durable transaction p50 / p99 / max (s)",
        lambda n: three(n, ("age_p50_s", "age_p99_s", "age_max_s")))
    row("steady commit latency p50 / p99 (ms)",
        lambda n: f"{one('steady', n).get('commit_ms_p50', '?')} / {one('steady', n).get('commit_ms_p99', '?')}")

    def rest(n):
        r = one("restore", n)
        if "error" in r:
            return "failed"
        return f"{r.get('seconds', '?')} s" + ("" if r.get("ok") else " (CHECK FAILED)")

    row("restore of the newest state", rest)
    row("restored rows / newest seq",
        lambda n: f"{one('restore', n).get('rows', '?')} / {one('restore', n).get('max_seq', '?')}")
    L.append("")
    L.append("Notes:")
    for n in names:
        for c in (r for r in by.get("rpo_check", []) if r["system"] == n):
            if "error" in c:
                L.append(f"- {n}: the recovery point check at {c.get('sample_s')} s could not restore: {c['error']}")
                continue
            verdict = ("the measure is exact there" if c["restored_seq"] == c["predicted_seq"] else
                       "the measure is conservative there (the state holds more)"
                       if c["restored_seq"] > c["predicted_seq"] else "THE MEASURE OVERSTATES THE STATE THERE")
            L.append(f"- {n}: recovery point checked at {c['sample_s']} s: {c['state']}, restored, holds "
                     f"transaction {c['restored_seq']}; the measure said {c['predicted_seq']}: {verdict}.")
    for n in ("litestream",):
        c = cost(n, "steady")
        if c.get("ltx_levels"):
            lv = ", ".join(f"L{k}: {v['files']} files, {human(v['bytes'])}" for k, v in c["ltx_levels"].items())
            L.append(f"- Litestream's uploads in the steady window by level: {lv}.")
        c = cost(n, "bulk")
        if c.get("ltx_levels"):
            lv = ", ".join(f"L{k}: {v['files']} files, {human(v['bytes'])}" for k, v in c["ltx_levels"].items())
            L.append(f"- Litestream's uploads in the bulk window by level: {lv}.")
    for r in by.get("settle", []):
        bad = [k for k, v in r["quiet_at"].items() if v is None]
        if bad:
            L.append(f"- After the {r['phase']} phase, {', '.join(bad)} did not go quiet within the cap.")
    for r in by.get("logcheck", []):
        if r["body_log"] != r["moto_log"]:
            L.append(f"- {r['system']}: the body log has {r['body_log']} requests, moto's own log "
                     f"{r['moto_log']}: they should agree.")
    for r in by.get("note", []):
        L.append(f"- {r['text']}")
    L.append("")
    L.append(METHOD)
    write_report(L, a.out)


METHOD = """How it is measured (scripts/bench-sqlite.sh --help has the details):
- Requests and bytes: each system has its own moto_server; a wrapper around moto writes one line
  per request (method, path, status, body bytes, end time). Bytes uploaded are PUT bodies. A
  phase's window runs from its start until the system's store went quiet: for owfs no request
  but its lease renewals for 5 s; for Litestream every L0 file compacted into L1 and L2 (its
  30 s and 5 min levels) and then no request but its LISTs of the levels for 35 s. So the
  compactions a phase causes are counted in it. Litestream's L3 (hourly) and snapshot (daily)
  levels cannot fire within a run, nor, in a short one, its deletion of L0 files 5 minutes
  after their compaction. Restores and the `owfs cat` calls of the measurement sign with
  another access key and are not counted.
- Recovery point: ten times a second through the steady phase, the newest state whose upload
  had ended by then (owfs: the generation record's conditional PUT; Litestream: an LTX file's
  PUT), the newest transaction that state holds (owfs: the transaction whose commit ended the
  WAL where the generation's record says its last commit frame is (salts and frame number,
  from `owfs log --json`), as the workload saw its own WAL after each commit; five
  generations are read back with `owfs cat`, their WAL checked as SQLite's recovery checks
  it, to confirm the mapping; Litestream: the newest transaction whose commit had returned
  by the LTX header's timestamp, which Litestream takes just after it read the WAL). Two
  figures: the loss window (how long the first transaction not in that state has been
  committed; 0 when the state is current: what a crash then would lose) and the age of the
  newest transaction in it (samples where a state of the phase is durable; in steady traffic
  about one transaction interval more than the loss window). A few samples (at random in the phase's last 200 s) are
  checked by restoring that very state and reading the newest transaction it holds (the notes
  say how each compared).
- Restore: `owfs restore WS DIR` / `litestream restore -o DIR/app.db`, into an empty directory,
  timed; then count(*), max(seq) and quick_check on the restored database."""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    add_store_commands(sub)
    q = sub.add_parser("moto")
    q.add_argument("-H", "--host", default="127.0.0.1")
    q.add_argument("-p", "--port", type=int, required=True)
    q.add_argument("--body-log", required=True)
    q.set_defaults(fn=cmd_moto)
    q = sub.add_parser("init")
    q.add_argument("db", nargs="+")
    q.set_defaults(fn=cmd_init)
    q = sub.add_parser("run")
    for k in ("owfs-db", "ls-db", "owfs-body-log", "ls-body-log", "owfs-moto-log", "ls-moto-log",
              "owfs-bin", "owfs-store", "owfs-ws", "owfs-endpoint", "litestream-bin",
              "ls-probe-config", "workdir", "out"):
        q.add_argument("--" + k, required=True)
    q.add_argument("--size", type=int, required=True)
    q.add_argument("--duration", type=float, required=True)
    q.add_argument("--rate", type=float, required=True)
    q.add_argument("--bulk", type=int, required=True)
    q.add_argument("--seed", type=int, default=27)
    q.add_argument("--owfs-quiet", type=float, default=5.0)
    q.add_argument("--ls-quiet", type=float, default=35.0)
    q.add_argument("--settle-max", type=float, default=420.0)
    q.add_argument("--checks", type=int, default=3)
    q.set_defaults(fn=cmd_run)
    q = sub.add_parser("report")
    q.add_argument("jsonl")
    q.add_argument("--out")
    q.set_defaults(fn=cmd_report)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
